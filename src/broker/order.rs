//! Per-publisher ordering of broadcast messages.
//!
//! Gossipsub delivers each message once, but not necessarily in publish order: two messages of
//! one publisher may reach a subscriber along different mesh paths. Every envelope carries the
//! publisher's epoch (chosen at its start) and a sequence number per topic, so a subscriber puts
//! each publisher's messages back in order. A message that arrives ahead of a gap waits for the
//! gap to fill for at most the reorder window; then the gap is given up (counted) and the waiting
//! messages are delivered. The first message of a publisher that does not start at 0 (this
//! subscriber joined late) waits only [`JOIN_WAIT`] for earlier ones. A message arriving after its gap was given up is dropped and counted
//! as late, rather than delivered out of order.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use crate::PeerId;

/// One publisher's stream of messages on one topic: a publisher process (epoch) of a peer.
pub(crate) type StreamKey = (PeerId, u64);

struct Stream<T> {
    /// The next sequence number to deliver; `None` before the first delivery.
    next: Option<u64>,
    waiting: BTreeMap<u64, T>,
    /// When the current gap is given up.
    give_up_at: Option<Instant>,
    last_seen: Instant,
}

/// What happened to the messages pushed so far, for the subscription's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Messages that arrived after their place had been given up, or twice.
    pub(crate) late: u64,
    /// Sequence numbers never seen: messages lost, or published before the subscription.
    pub(crate) skipped: u64,
}

/// How long the first message of a stream that does not start at 0 (a subscriber that joined
/// while the publisher was publishing) waits for earlier ones.
pub(crate) const JOIN_WAIT: Duration = Duration::from_millis(500);

/// Reorders messages of many publishers.
pub(crate) struct Reorder<T> {
    window: Duration,
    max_waiting: usize,
    max_streams: usize,
    streams: HashMap<StreamKey, Stream<T>>,
    pub(crate) counts: Counts,
}

impl<T> Reorder<T> {
    /// `window`: how long a gap is waited for; `max_waiting`: the most messages held per stream
    /// (a longer gap is given up at once); `max_streams`: the most publishers tracked (the least
    /// recently seen is forgotten beyond).
    pub(crate) fn new(window: Duration, max_waiting: usize, max_streams: usize) -> Self {
        Self {
            window,
            max_waiting: max_waiting.max(1),
            max_streams: max_streams.max(1),
            streams: HashMap::new(),
            counts: Counts::default(),
        }
    }

    /// Takes one message and returns the messages now deliverable, in order.
    pub(crate) fn push(&mut self, key: StreamKey, seq: u64, item: T, now: Instant) -> Vec<T> {
        let mut ready = Vec::new();
        if !self.streams.contains_key(&key) && self.streams.len() >= self.max_streams {
            self.forget_oldest(&mut ready);
        }
        let stream = self.streams.entry(key).or_insert_with(|| Stream {
            next: None,
            waiting: BTreeMap::new(),
            give_up_at: None,
            last_seen: now,
        });
        stream.last_seen = now;
        match stream.next {
            Some(next) if seq < next => {
                self.counts.late += 1;
                return ready;
            }
            Some(next) if seq == next => {
                ready.push(item);
                stream.next = Some(seq + 1);
            }
            // The first message of a stream that starts at 0 needs no wait.
            None if seq == 0 => {
                ready.push(item);
                stream.next = Some(1);
            }
            _ => {
                if stream.waiting.insert(seq, item).is_some() {
                    self.counts.late += 1;
                }
                if stream.give_up_at.is_none() {
                    let wait = if stream.next.is_none() {
                        JOIN_WAIT.min(self.window)
                    } else {
                        self.window
                    };
                    stream.give_up_at = Some(now + wait);
                }
                if stream.waiting.len() > self.max_waiting {
                    Self::give_up(stream, &mut self.counts, &mut ready, now, self.window);
                    return ready;
                }
            }
        }
        Self::drain(stream, &mut ready);
        if stream.waiting.is_empty() {
            stream.give_up_at = None;
        } else if !ready.is_empty() {
            stream.give_up_at = Some(now + self.window);
        }
        ready
    }

    /// Gives up the gaps whose window has passed; returns the messages now deliverable.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<T> {
        let mut ready = Vec::new();
        for stream in self.streams.values_mut() {
            if stream.give_up_at.is_some_and(|at| at <= now) {
                Self::give_up(stream, &mut self.counts, &mut ready, now, self.window);
            }
        }
        ready
    }

    /// When the next gap is given up, if one is open.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.streams.values().filter_map(|s| s.give_up_at).min()
    }

    fn give_up(
        stream: &mut Stream<T>,
        counts: &mut Counts,
        ready: &mut Vec<T>,
        now: Instant,
        window: Duration,
    ) {
        if let Some((&first, _)) = stream.waiting.first_key_value() {
            if let Some(next) = stream.next {
                counts.skipped += first - next;
            }
            stream.next = Some(first);
        }
        Self::drain(stream, ready);
        stream.give_up_at = (!stream.waiting.is_empty()).then(|| now + window);
    }

    fn drain(stream: &mut Stream<T>, ready: &mut Vec<T>) {
        while let Some(next) = stream.next {
            match stream.waiting.remove(&next) {
                Some(item) => {
                    ready.push(item);
                    stream.next = Some(next + 1);
                }
                None => break,
            }
        }
    }

    fn forget_oldest(&mut self, ready: &mut Vec<T>) {
        let Some(oldest) = self
            .streams
            .iter()
            .min_by_key(|(_, s)| s.last_seen)
            .map(|(k, _)| *k)
        else {
            return;
        };
        if let Some(stream) = self.streams.remove(&oldest) {
            ready.extend(stream.waiting.into_values());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u64) -> StreamKey {
        (PeerId::random(), n)
    }

    #[test]
    fn in_order_messages_pass_straight_through() {
        let mut r = Reorder::new(Duration::from_secs(1), 100, 10);
        let k = key(1);
        let now = Instant::now();
        for i in 0..5 {
            assert_eq!(r.push(k, i, i, now), vec![i]);
        }
        assert_eq!(r.next_deadline(), None);
        assert_eq!(r.counts, Counts::default());
    }

    #[test]
    fn swapped_messages_are_put_back_in_order() {
        let mut r = Reorder::new(Duration::from_secs(1), 100, 10);
        let k = key(1);
        let now = Instant::now();
        assert_eq!(r.push(k, 0, 0, now), vec![0]);
        assert_eq!(r.push(k, 2, 2, now), Vec::<u64>::new());
        assert!(r.next_deadline().is_some());
        assert_eq!(r.push(k, 1, 1, now), vec![1, 2]);
        assert_eq!(r.next_deadline(), None);
        // A repeat is late, not delivered twice.
        assert_eq!(r.push(k, 1, 1, now), Vec::<u64>::new());
        assert_eq!(r.counts.late, 1);
    }

    #[test]
    fn a_gap_is_given_up_after_the_window_and_late_arrivals_dropped() {
        let mut r = Reorder::new(Duration::from_secs(1), 100, 10);
        let k = key(1);
        let t0 = Instant::now();
        r.push(k, 0, 0, t0);
        r.push(k, 3, 3, t0);
        r.push(k, 4, 4, t0);
        assert!(r.expire(t0 + Duration::from_millis(500)).is_empty());
        assert_eq!(r.expire(t0 + Duration::from_secs(1)), vec![3, 4]);
        assert_eq!(r.counts.skipped, 2);
        assert!(r.push(k, 1, 1, t0).is_empty());
        assert_eq!(r.counts.late, 1);
    }

    #[test]
    fn a_late_joiner_waits_briefly_for_earlier_messages() {
        let mut r = Reorder::new(Duration::from_secs(5), 100, 10);
        let k = key(1);
        let t0 = Instant::now();
        assert!(r.push(k, 41, 41, t0).is_empty());
        assert_eq!(r.push(k, 40, 40, t0), Vec::<u64>::new());
        assert!(r.expire(t0 + JOIN_WAIT / 2).is_empty());
        assert_eq!(r.expire(t0 + JOIN_WAIT), vec![40, 41]);
        assert_eq!(r.counts.skipped, 0);
        assert_eq!(r.push(k, 42, 42, t0), vec![42]);
    }

    #[test]
    fn streams_are_independent_and_bounded() {
        let mut r = Reorder::new(Duration::from_secs(1), 2, 2);
        let t0 = Instant::now();
        let (a, b, c) = (key(1), key(2), key(3));
        r.push(a, 0, 0, t0);
        r.push(b, 0, 10, t0 + Duration::from_millis(1));
        // Too many waiting in one stream: the gap is given up at once.
        r.push(a, 5, 5, t0);
        r.push(a, 6, 6, t0);
        assert_eq!(r.push(a, 7, 7, t0), vec![5, 6, 7]);
        assert_eq!(r.counts.skipped, 4);
        // A third publisher evicts the least recently seen stream.
        assert_eq!(r.push(c, 0, 20, t0 + Duration::from_millis(2)), vec![20]);
        assert_eq!(r.streams.len(), 2);
    }
}
