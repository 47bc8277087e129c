//! The distributions synthetic flows draw from, shared by the load generator's batches and the
//! codec benchmarks, so that both measure the same kind of flow.

use flowattr_common::RoundTrip;

/// Log-normal with the given median and a spread of `sigma` (natural log units): durations,
/// byte counts and round trips all have a long tail.
pub fn log_normal(rng: &mut fastrand::Rng, median: f64, sigma: f64) -> f64 {
    // Box-Muller.
    let (u1, u2) = (rng.f64().max(f64::MIN_POSITIVE), rng.f64());
    let normal = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    median * (sigma * normal).exp()
}

/// In-region round trips: a few hundred µs with a long tail; one connection in 50 never
/// answered.
pub fn round_trip(rng: &mut fastrand::Rng) -> Option<RoundTrip> {
    (rng.u8(..50) != 0).then(|| {
        let smoothed = log_normal(rng, 300.0, 0.8).clamp(1.0, 1e6);
        RoundTrip {
            smoothed_us: smoothed as u32,
            deviation_us: (smoothed * rng.f64() / 2.0) as u32,
        }
    })
}
