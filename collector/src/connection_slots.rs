//! Places for open connections, bounded in all and per client address, so that one address
//! (a misbehaving host, a scanner, a client opening sockets it never uses) cannot take every
//! place and turn the others away. Shared by the exporter ingest and the control plane; taken
//! and given back once per connection, never per frame or request.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The connections open now, and what they may grow to.
#[derive(Debug)]
pub struct ConnectionSlots {
    max_total: usize,
    max_per_address: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// Why a connection got no place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSlot {
    /// Every place is taken.
    Full,
    /// Its address holds its share already.
    AddressFull,
}

/// One connection's place, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<ConnectionSlots>,
    address: IpAddr,
}

impl ConnectionSlots {
    pub fn new(max_total: usize, max_per_address: usize) -> Arc<ConnectionSlots> {
        Arc::new(ConnectionSlots {
            max_total,
            max_per_address,
            open: Mutex::default(),
        })
    }

    pub fn take(self: &Arc<Self>, address: IpAddr) -> Result<Slot, NoSlot> {
        let mut open = self.lock();
        if open.total >= self.max_total {
            return Err(NoSlot::Full);
        }
        let mine = open.by_address.entry(address).or_default();
        if *mine >= self.max_per_address {
            return Err(NoSlot::AddressFull);
        }
        *mine += 1;
        open.total += 1;
        Ok(Slot {
            slots: self.clone(),
            address,
        })
    }

    /// Connections holding a place now.
    pub fn open(&self) -> usize {
        self.lock().total
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        // The counts stay consistent under a panic elsewhere: every change is one statement.
        self.open
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.lock();
        open.total -= 1;
        if let Some(count) = open.by_address.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.by_address.remove(&self.address);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_takes_its_share_and_the_rest_stays_for_others() {
        let slots = ConnectionSlots::new(4, 2);
        let (a, b, c) = (
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            "10.0.0.3".parse().unwrap(),
        );
        let first = slots.take(a).unwrap();
        let _second = slots.take(a).unwrap();
        assert_eq!(slots.take(a).unwrap_err(), NoSlot::AddressFull);
        let _third = slots.take(b).unwrap();
        let _fourth = slots.take(b).unwrap();
        assert_eq!(slots.take(c).unwrap_err(), NoSlot::Full);
        assert_eq!(slots.open(), 4);
        drop(first);
        assert_eq!(slots.open(), 3);
        let _again = slots.take(c).unwrap();
        assert_eq!(slots.open(), 4);
        assert_eq!(slots.take(a).unwrap_err(), NoSlot::Full);
    }
}
