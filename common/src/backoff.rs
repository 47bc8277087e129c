//! How a sender waits between failed tries: 100 ms doubling to 10 s, each wait drawn from half
//! to one and a half times its step, so that a fleet of exporters (or a region's nodes) whose
//! collector restarted do not all come back in the same instant.

use std::time::Duration;

const FIRST: Duration = Duration::from_millis(100);
const MAX: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Backoff {
    step: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { step: FIRST }
    }
}

impl Backoff {
    /// After a success: the next failure waits the first step again.
    pub fn reset(&mut self) {
        self.step = FIRST;
    }

    /// How long to wait after this failure; the step doubles for the next one.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.step.mul_f64(0.5 + fastrand::f64());
        self.step = (self.step * 2).min(MAX);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_to_the_cap_each_jittered_within_half_its_step() {
        let mut backoff = Backoff::default();
        let steps = [100, 200, 400, 800, 1_600, 3_200, 6_400, 10_000, 10_000];
        for step in steps {
            let wait = backoff.next_wait().as_secs_f64() * 1_000.0;
            assert!(
                wait >= step as f64 * 0.5 && wait < step as f64 * 1.5,
                "{wait} ms for a step of {step} ms"
            );
        }
        backoff.reset();
        assert!(backoff.next_wait() < Duration::from_millis(150));
        // Jittered: a thousand fleets do not all draw the same wait.
        let waits: std::collections::HashSet<Duration> =
            (0..1_000).map(|_| Backoff::default().next_wait()).collect();
        assert!(waits.len() > 900, "{}", waits.len());
    }
}
