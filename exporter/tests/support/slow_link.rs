//! Two network namespaces joined by a link that holds every packet for a delay (which a test
//! may change while connections are open): a TUN device in each, and a relay per direction
//! that reads a packet from one device and writes it to the other once the delay has passed. The kernels these tests run on may lack netem; this
//! is its delay, in user space, so that a connection has a round trip far above loopback's.

use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{delete_namespaces, fresh_namespace, ip};

pub struct SlowLink {
    pub names: [String; 2],
    pub ips: [Ipv4Addr; 2],
    /// Each way, in microseconds.
    delay_us: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    relays: Vec<JoinHandle<()>>,
}

impl SlowLink {
    /// Namespaces `fa-{tag}-a` and `-b`, at 10.232.`subnet`.1 and .2, each packet held
    /// `delay` on its way: a round trip of twice `delay`.
    pub fn new(tag: &str, subnet: u8, delay: Duration) -> SlowLink {
        let names = [format!("fa-{tag}-a"), format!("fa-{tag}-b")];
        let ips = [
            Ipv4Addr::new(10, 232, subnet, 1),
            Ipv4Addr::new(10, 232, subnet, 2),
        ];
        let mut devices = Vec::new();
        for (side, name) in names.iter().enumerate() {
            fresh_namespace(name);
            // Made here, then moved: the open file keeps the device wherever it goes.
            let device = format!("fa{tag}{}", ["a", "b"][side]);
            devices.push(open_tun(&device));
            ip(&["link", "set", "dev", &device, "netns", name]);
            let address = format!("{}/24", ips[side]);
            ip(&["-n", name, "addr", "add", &address, "dev", &device]);
            ip(&["-n", name, "link", "set", &device, "up"]);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let delay_us = Arc::new(AtomicU64::new(delay.as_micros() as u64));
        let mut relays = Vec::new();
        for (from, to) in [(0, 1), (1, 0)] {
            let reader = devices[from].try_clone().unwrap();
            let writer = devices[to].try_clone().unwrap();
            relays.extend(relay(reader, writer, delay_us.clone(), stop.clone()));
        }
        SlowLink {
            names,
            ips,
            delay_us,
            stop,
            relays,
        }
    }

    /// Holds every packet read from now on for `delay` (each way).
    #[allow(dead_code)] // Not every test binary that has this module changes the delay.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for relay in self.relays.drain(..) {
            let _ = relay.join();
        }
        delete_namespaces(&self.names);
    }
}

/// A TUN device named `name` (IP packets, no extra header), open for reading and writing.
fn open_tun(name: &str) -> File {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("/dev/net/tun");
    // struct ifreq: the name, then the flags in the union that follows it.
    #[repr(C)]
    struct InterfaceRequest {
        name: [u8; 16],
        flags: libc::c_short,
        _rest: [u8; 22],
    }
    let mut request = InterfaceRequest {
        name: [0; 16],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _rest: [0; 22],
    };
    request.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one struct ifreq, which InterfaceRequest lays out in
    // full (40 bytes), and the file is open for the call's duration.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) };
    assert_eq!(
        rc,
        0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    file
}

/// Two threads: one reads packets from `from` and stamps them, the other writes each to `to`
/// once the delay (µs) has passed since it was read, in order.
fn relay(
    mut from: File,
    mut to: File,
    delay_us: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> [JoinHandle<()>; 2] {
    let (sender, receiver) = mpsc::channel::<(Instant, Vec<u8>)>();
    let reading = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0; 65_536];
            while !stop.load(Ordering::Relaxed) {
                let mut poll = libc::pollfd {
                    fd: from.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                if unsafe { libc::poll(&mut poll, 1, 50) } <= 0 {
                    continue;
                }
                let Ok(len) = from.read(&mut buf) else {
                    continue;
                };
                let delay = Duration::from_micros(delay_us.load(Ordering::Relaxed));
                if sender
                    .send((Instant::now() + delay, buf[..len].to_vec()))
                    .is_err()
                {
                    return;
                }
            }
        })
    };
    let writing = std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Ok((due, packet)) = receiver.recv_timeout(Duration::from_millis(50)) else {
                continue;
            };
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            // A packet the other side cannot take (its device going down) is lost, as on a
            // real link.
            let _ = to.write(&packet);
        }
    });
    [reading, writing]
}
