//! Amount NAKs for FEC blocks: "block `f`: `n` more symbols, any", as a sans-I/O state
//! machine beside the unit NAK engine ([`super::nak`]).
//!
//! With FEC, what a short receiver needs is *some* number of a block's symbols, not given
//! packets: the server answers an amount with extra symbols that are new to every receiver
//! ([`crate::archive::extras`]), so one answer serves every receiver short in that block
//! whatever each lost. Suppression therefore works on counts: a receiver that hears another
//! ask for at least as many symbols of the block as it needs keeps quiet.
//!
//! The cycle is the unit engine's (NORM's): a block found short waits a random back-off
//! (the same truncated exponential over `K · GRTT`); hearing a big-enough request moves it
//! to hold-off; when the back-off runs out its NAK goes, and it holds off for the answer
//! (four GRTTs plus the time the answer takes at the server's repair share). When a hold-off
//! ends, the block is asked about again: still short, it re-enters back-off with what it is
//! short by now.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::nak::{backoff, MAX_HEARD_HOLDS};

/// Most FEC blocks with an amount outstanding at once (bounds memory; blocks beyond it are
/// asked for when one leaves).
pub const MAX_SHORT_BLOCKS: usize = 65_536;

#[derive(Debug, Clone, Default, Serialize)]
pub struct SymbolNakCounters {
    /// Amounts sent (one per block per NAK), and the symbols they asked for.
    pub amounts_naked: u64,
    pub symbols_naked: u64,
    /// Amounts not sent because another receiver asked for at least as many.
    pub amounts_suppressed: u64,
    /// Heard amounts that did not suppress ours: the block had been held back by heard NAKs
    /// [`MAX_HEARD_HOLDS`] times already (a forged NAK flood shows here).
    pub amounts_heard_ignored: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Backoff(Instant),
    Holdoff(Instant),
}

#[derive(Clone, Copy, Debug)]
struct Short {
    need: u32,
    stage: Stage,
    /// Times heard NAKs held this block back while it stayed short (see `held`).
    heard_holds: u8,
}

pub struct SymbolNaks {
    blocks: BTreeMap<u64, Short>,
    /// Heard holds of blocks whose hold-off ran out, until they are asked about again: peers'
    /// NAKs are unauthenticated, so they may hold a block back only [`MAX_HEARD_HOLDS`]
    /// times while it stays short, however many hold-off rounds that spans.
    held: BTreeMap<u64, u8>,
    rng: SmallRng,
    pub counters: SymbolNakCounters,
}

impl SymbolNaks {
    pub fn new(seed: u64) -> SymbolNaks {
        SymbolNaks {
            blocks: BTreeMap::new(),
            held: BTreeMap::new(),
            rng: SmallRng::seed_from_u64(seed ^ 0x5eed_5e11),
            counters: SymbolNakCounters::default(),
        }
    }

    /// Block `f` is short by `need` symbols (already inflated for expected loss). A block in
    /// hold-off waits for its answer; one in back-off asks for the larger amount.
    /// `bounds`: the back-off's `T_max` and group size ([`super::nak::NakEngine::backoff_bounds`]).
    pub fn short(&mut self, now: Instant, f: u64, need: u32, bounds: (Duration, u32)) {
        if need == 0 {
            return;
        }
        if let Some(s) = self.blocks.get_mut(&f) {
            if let Stage::Backoff(_) = s.stage {
                s.need = s.need.max(need);
            }
            return;
        }
        if self.blocks.len() >= MAX_SHORT_BLOCKS {
            return;
        }
        let wait = backoff(self.rng.gen(), bounds.0, bounds.1);
        self.blocks.insert(
            f,
            Short {
                need,
                stage: Stage::Backoff(now + wait),
                heard_holds: self.held.remove(&f).unwrap_or(0),
            },
        );
    }

    /// Symbols asked for (or heard asked) whose answers are still awaited: the server pays
    /// amounts one block after another, so a block's answer waits behind the others'.
    fn awaited(&self) -> u32 {
        self.blocks
            .values()
            .filter(|s| matches!(s.stage, Stage::Holdoff(_)))
            .map(|s| s.need)
            .fold(0u32, u32::saturating_add)
    }

    /// Another receiver's NAK asked for these (block, amount)s: an amount at least ours, for
    /// a block still in back-off, is as good as ours (the server answers the largest asked),
    /// so ours holds off for that answer. `holdoff(n)` is the wait for answers of `n`
    /// symbols in all (those already awaited included).
    pub fn on_heard(
        &mut self,
        now: Instant,
        heard: &[(u64, u32)],
        holdoff: impl Fn(u32) -> Duration,
    ) {
        for &(f, m) in heard {
            let awaited = self.awaited();
            if let Some(s) = self.blocks.get_mut(&f) {
                if matches!(s.stage, Stage::Backoff(_)) && m >= s.need {
                    if s.heard_holds >= MAX_HEARD_HOLDS {
                        self.counters.amounts_heard_ignored += 1;
                        continue;
                    }
                    s.heard_holds += 1;
                    s.stage = Stage::Holdoff(now + holdoff(awaited.saturating_add(m)));
                    self.counters.amounts_suppressed += 1;
                }
            }
        }
    }

    /// Amounts whose back-off ran out, at most `max` (the rest go in the next NAK): they go
    /// in one NAK and hold off for their answers, behind those already awaited.
    /// `still_short(f)` is what block `f` is short by now (0: decoded or complete meanwhile;
    /// it is forgotten).
    pub fn poll(
        &mut self,
        now: Instant,
        max: usize,
        still_short: impl Fn(u64) -> u32,
        holdoff: impl Fn(u32) -> Duration,
    ) -> Vec<(u64, u32)> {
        let due: Vec<u64> = self
            .blocks
            .iter()
            .filter(|(_, s)| matches!(s.stage, Stage::Backoff(t) if t <= now))
            .map(|(f, _)| *f)
            .take(max)
            .collect();
        let mut out = Vec::with_capacity(due.len());
        let mut awaited = self.awaited();
        for f in due {
            let now_short = still_short(f);
            if now_short == 0 {
                self.blocks.remove(&f);
                continue;
            }
            let s = self.blocks.get_mut(&f).expect("listed");
            let n = s.need.min(now_short.max(1)).max(1);
            s.need = n;
            awaited = awaited.saturating_add(n);
            s.stage = Stage::Holdoff(now + holdoff(awaited));
            self.counters.amounts_naked += 1;
            self.counters.symbols_naked += n as u64;
            out.push((f, n));
        }
        out
    }

    /// Blocks whose hold-off ran out: forgotten here, for the caller to ask about again
    /// ([`Self::short`]) if they still are.
    pub fn expired(&mut self, now: Instant) -> Vec<u64> {
        let done: Vec<u64> = self
            .blocks
            .iter()
            .filter(|(_, s)| matches!(s.stage, Stage::Holdoff(t) if t <= now))
            .map(|(f, _)| *f)
            .collect();
        if self.held.len() > MAX_SHORT_BLOCKS {
            self.held.clear(); // blocks that never came back short; bounded memory first
        }
        for f in &done {
            if let Some(s) = self.blocks.remove(f) {
                if s.heard_holds > 0 {
                    self.held.insert(*f, s.heard_holds);
                }
            }
        }
        done
    }

    /// The next moment a back-off or hold-off runs out.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.blocks
            .values()
            .map(|s| match s.stage {
                Stage::Backoff(t) | Stage::Holdoff(t) => t,
            })
            .min()
    }

    /// No amount outstanding.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_short_block_is_asked_for_once_then_held_off_and_asked_again() {
        let t0 = Instant::now();
        let mut s = SymbolNaks::new(1);
        s.short(t0, 3, 40, (80 * MS, 10));
        // A second finding in back-off raises the amount.
        s.short(t0, 3, 50, (80 * MS, 10));
        let at = s.poll_timeout().unwrap();
        assert!(at <= t0 + 80 * MS);
        assert!(s.poll(at, 96, |_| 60, |_| 40 * MS) == vec![(3, 50)]);
        // Held off: nothing more, and a new finding does not ask again.
        s.short(at, 3, 70, (80 * MS, 10));
        assert!(s.poll(at + 10 * MS, 96, |_| 60, |_| 40 * MS).is_empty());
        assert_eq!(s.expired(at + 39 * MS), Vec::<u64>::new());
        assert_eq!(s.expired(at + 40 * MS), vec![3]);
        assert!(s.is_empty());
        assert_eq!(s.counters.amounts_naked, 1);
        assert_eq!(s.counters.symbols_naked, 50);
    }

    #[test]
    fn a_heard_amount_suppresses_only_if_it_covers_ours() {
        let t0 = Instant::now();
        let mut s = SymbolNaks::new(2);
        s.short(t0, 1, 30, (80 * MS, 10));
        s.short(t0, 2, 30, (80 * MS, 10));
        s.on_heard(t0, &[(1, 29), (2, 30)], |_| 40 * MS);
        assert_eq!(s.counters.amounts_suppressed, 1);
        let naks = s.poll(t0 + 80 * MS, 96, |_| 30, |_| 40 * MS);
        assert_eq!(naks, vec![(1, 30)]);
    }

    /// Heard amounts hold a short block back at most MAX_HEARD_HOLDS times across hold-off
    /// rounds: a forger repeating them on the group delays our NAK, never stops it.
    #[test]
    fn heard_amounts_cannot_silence_a_receiver() {
        let t0 = Instant::now();
        let mut s = SymbolNaks::new(2);
        let mut now = t0;
        for round in 0..=MAX_HEARD_HOLDS as u32 {
            s.short(now, 7, 30, (80 * MS, 10));
            s.on_heard(now, &[(7, 1000)], |_| 40 * MS);
            let naks = s.poll(now + 80 * MS, 96, |_| 30, |_| 40 * MS);
            if round < MAX_HEARD_HOLDS as u32 {
                assert!(naks.is_empty(), "round {round}: held by the heard amount");
                now += 40 * MS;
                assert_eq!(s.expired(now), vec![7]);
            } else {
                assert_eq!(
                    naks,
                    vec![(7, 30)],
                    "the forged amounts silenced the receiver"
                );
            }
        }
        assert_eq!(s.counters.amounts_suppressed, MAX_HEARD_HOLDS as u64);
        assert_eq!(s.counters.amounts_heard_ignored, 1);
    }

    #[test]
    fn a_block_asked_behind_others_waits_for_their_answers_too() {
        // The server pays one block after another: the second of two amounts sent together
        // holds off for both answers (1 ms per symbol here), so it is not asked again while
        // its answer is still queued behind the first.
        let t0 = Instant::now();
        let mut s = SymbolNaks::new(4);
        s.short(t0, 1, 100, (Duration::ZERO, 1));
        s.short(t0, 2, 100, (Duration::ZERO, 1));
        let per = |n: u32| MS * n;
        assert_eq!(s.poll(t0, 96, |_| 100, per), vec![(1, 100), (2, 100)]);
        assert_eq!(s.expired(t0 + 100 * MS), vec![1]);
        assert_eq!(s.expired(t0 + 199 * MS), Vec::<u64>::new());
        assert_eq!(s.expired(t0 + 200 * MS), vec![2]);
    }

    #[test]
    fn a_block_decoded_meanwhile_is_not_asked_for() {
        let t0 = Instant::now();
        let mut s = SymbolNaks::new(3);
        s.short(t0, 5, 10, (Duration::ZERO, 1));
        assert!(s.poll(t0, 96, |_| 0, |_| 40 * MS).is_empty());
        assert!(s.is_empty());
    }
}
