//! Interval map from device block ranges to overlay block states, the in-memory form of the overlay map log.

use std::collections::BTreeMap;

/// What the overlay holds for a block; blocks absent from the map read from the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockState {
    /// The overlay file holds the block's data at the block's own offset.
    Data,
    /// The block reads as zeros (trimmed or zeroed); the overlay file has a hole there.
    Zero,
}

/// A run of blocks `start..end` and its state (`None`: read from the image).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub start: u64,
    pub end: u64,
    pub state: Option<BlockState>,
}

/// Non-overlapping block intervals with a state each. Adjacent intervals
/// of the same state are merged, so the map stays as small as the write
/// pattern allows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeMap {
    /// Interval start -> (interval end, state); intervals never overlap.
    intervals: BTreeMap<u64, (u64, BlockState)>,
}

impl RangeMap {
    pub fn is_empty(&self) -> bool {
        self.intervals.is_empty()
    }

    /// Number of stored intervals.
    pub fn len(&self) -> usize {
        self.intervals.len()
    }

    /// Sets blocks `start..end` to `state`, replacing what was there.
    pub fn set(&mut self, start: u64, end: u64, state: BlockState) {
        if start >= end {
            return;
        }
        let mut kept = Vec::new();

        // An interval starting before `start` may reach into the range.
        if let Some((&left_start, &(left_end, left_state))) =
            self.intervals.range(..start).next_back()
        {
            if left_end > start {
                self.intervals.remove(&left_start);
                kept.push((left_start, start, left_state));
                if left_end > end {
                    kept.push((end, left_end, left_state));
                }
            }
        }
        let inside: Vec<u64> = self
            .intervals
            .range(start..end)
            .map(|(&key, _)| key)
            .collect();
        for key in inside {
            if let Some((old_end, old_state)) = self.intervals.remove(&key) {
                if old_end > end {
                    kept.push((end, old_end, old_state));
                }
            }
        }
        for (piece_start, piece_end, piece_state) in kept {
            self.intervals.insert(piece_start, (piece_end, piece_state));
        }

        let mut new_start = start;
        let mut new_end = end;
        if let Some((&left_start, &(left_end, left_state))) =
            self.intervals.range(..start).next_back()
        {
            if left_end == start && left_state == state {
                self.intervals.remove(&left_start);
                new_start = left_start;
            }
        }
        if let Some(&(right_end, right_state)) = self.intervals.get(&end) {
            if right_state == state {
                self.intervals.remove(&end);
                new_end = right_end;
            }
        }
        self.intervals.insert(new_start, (new_end, state));
    }

    /// Splits blocks `start..end` into runs of one state, in order, covering
    /// the range exactly.
    pub fn runs(&self, start: u64, end: u64) -> Vec<Run> {
        let mut runs = Vec::new();
        let mut cursor = start;
        let first_key = match self.intervals.range(..=start).next_back() {
            Some((&key, &(interval_end, _))) if interval_end > start => key,
            _ => start,
        };
        for (&interval_start, &(interval_end, state)) in self.intervals.range(first_key..end) {
            if interval_start > cursor {
                runs.push(Run {
                    start: cursor,
                    end: interval_start,
                    state: None,
                });
            }
            let run_start = interval_start.max(cursor);
            let run_end = interval_end.min(end);
            if run_end > run_start {
                runs.push(Run {
                    start: run_start,
                    end: run_end,
                    state: Some(state),
                });
                cursor = run_end;
            }
        }
        if cursor < end {
            runs.push(Run {
                start: cursor,
                end,
                state: None,
            });
        }
        runs
    }

    /// Iterates the stored intervals as `(start, end, state)` in block order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, BlockState)> + '_ {
        self.intervals
            .iter()
            .map(|(&start, &(end, state))| (start, end, state))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use BlockState::{Data, Zero};

    /// Applies `sets` to an empty map and compares the stored intervals.
    #[test]
    fn set_splits_and_merges() {
        type Case = (
            &'static str,
            &'static [(u64, u64, BlockState)],
            &'static [(u64, u64, BlockState)],
        );
        let cases: &[Case] = &[
            ("single", &[(2, 5, Data)], &[(2, 5, Data)]),
            ("empty_range_ignored", &[(5, 5, Data)], &[]),
            (
                "adjacent_same_merges",
                &[(2, 5, Data), (5, 8, Data)],
                &[(2, 8, Data)],
            ),
            (
                "adjacent_left_merges",
                &[(5, 8, Data), (2, 5, Data)],
                &[(2, 8, Data)],
            ),
            (
                "adjacent_other_kept",
                &[(2, 5, Data), (5, 8, Zero)],
                &[(2, 5, Data), (5, 8, Zero)],
            ),
            (
                "split_middle",
                &[(0, 10, Data), (4, 6, Zero)],
                &[(0, 4, Data), (4, 6, Zero), (6, 10, Data)],
            ),
            (
                "cover_several",
                &[(0, 2, Data), (3, 4, Zero), (6, 9, Data), (1, 7, Zero)],
                &[(0, 1, Data), (1, 7, Zero), (7, 9, Data)],
            ),
            (
                "overwrite_same_state",
                &[(0, 10, Data), (3, 5, Data)],
                &[(0, 10, Data)],
            ),
            (
                "bridge_merges_both",
                &[(0, 2, Zero), (4, 6, Zero), (2, 4, Zero)],
                &[(0, 6, Zero)],
            ),
        ];
        for (name, sets, expected) in cases {
            let mut map = RangeMap::default();
            for &(start, end, state) in *sets {
                map.set(start, end, state);
            }
            let got: Vec<_> = map.iter().collect();
            assert_eq!(got, expected.to_vec(), "case {name}");
        }
    }

    #[test]
    fn runs_cover_range_exactly() {
        let mut map = RangeMap::default();
        map.set(2, 4, Data);
        map.set(6, 8, Zero);
        type Case = (
            &'static str,
            u64,
            u64,
            &'static [(u64, u64, Option<BlockState>)],
        );
        let cases: &[Case] = &[
            ("all_image", 10, 12, &[(10, 12, None)]),
            ("inside_data", 3, 4, &[(3, 4, Some(Data))]),
            (
                "mixed",
                0,
                10,
                &[
                    (0, 2, None),
                    (2, 4, Some(Data)),
                    (4, 6, None),
                    (6, 8, Some(Zero)),
                    (8, 10, None),
                ],
            ),
            (
                "starts_inside",
                3,
                7,
                &[(3, 4, Some(Data)), (4, 6, None), (6, 7, Some(Zero))],
            ),
            ("empty", 5, 5, &[]),
        ];
        for (name, start, end, expected) in cases {
            let got: Vec<_> = map
                .runs(*start, *end)
                .into_iter()
                .map(|run| (run.start, run.end, run.state))
                .collect();
            assert_eq!(got, expected.to_vec(), "case {name}");
        }
    }
}
