//! The pause between two polls of a busy name.
//!
//! Uniformly random between the range's minimum and a ceiling that doubles
//! with every busy poll, up to the range's maximum; the ceiling starts over
//! at the minimum when the name changes hands (a new holder may release
//! soon, as the last one did). Randomness spreads the polls of processes
//! that saw the same release.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use super::config::BusyWait;

pub(crate) struct Backoff {
    range: BusyWait,
    ceiling: Duration,
    state: u64,
}

impl Backoff {
    pub(crate) fn new(range: BusyWait) -> Self {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_usize(&range as *const BusyWait as usize);
        Self {
            range,
            ceiling: range.min,
            state: hasher.finish() | 1,
        }
    }

    /// Starts over at the minimum.
    pub(crate) fn reset(&mut self) {
        self.ceiling = self.range.min;
    }

    /// The next pause, and a higher ceiling for the one after.
    pub(crate) fn next_pause(&mut self) -> Duration {
        let (min, ceiling) = (self.range.min, self.ceiling.max(self.range.min));
        let span = ceiling.saturating_sub(min).as_nanos() as u64;
        let jitter = if span == 0 {
            0
        } else {
            self.random() % (span + 1)
        };
        self.ceiling = (ceiling * 2).min(self.range.max);
        min + Duration::from_nanos(jitter)
    }

    /// xorshift64*: enough to spread polls.
    fn random(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_stay_in_range_grow_and_start_over() {
        let range = BusyWait {
            min: Duration::from_millis(250),
            max: Duration::from_secs(1),
        };
        let mut backoff = Backoff::new(range);
        assert_eq!(
            backoff.next_pause(),
            range.min,
            "the first pause is the minimum"
        );
        let mut longest = Duration::ZERO;
        for _ in 0..200 {
            let pause = backoff.next_pause();
            assert!(pause >= range.min && pause <= range.max, "{pause:?}");
            longest = longest.max(pause);
        }
        assert!(
            longest > Duration::from_millis(750),
            "the ceiling grew: {longest:?}"
        );
        backoff.reset();
        assert_eq!(backoff.next_pause(), range.min);
    }
}
