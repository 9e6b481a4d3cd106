//! Sequential read detection per layer and the read-ahead window it grows, in the manner
//! of the kernel's page cache read-ahead: the window doubles while reads stay sequential.

/// Distance in bytes a read may start before or after the end of the previous one and
/// still count as sequential. Clients keep several requests in flight, so consecutive
/// requests can arrive slightly out of order.
const SEQUENTIAL_SLACK: u64 = 256 * 1024;

/// First read-ahead window once a second sequential read is seen.
const INITIAL_WINDOW: u64 = 512 * 1024;

/// One layer's read-ahead state.
#[derive(Debug, Default)]
pub(crate) struct ReadAhead {
    /// End of the previous read in the layer's data space; `None` before the first read.
    last_end: Option<u64>,
    /// Current window size in bytes; 0 while reads are not sequential.
    window: u64,
    /// End of the data range read-ahead already asked for.
    issued_end: u64,
}

impl ReadAhead {
    /// Records a read of `offset..offset + len` and returns the data range to fetch ahead,
    /// if any: the window after the read, clamped to `data_size`. A new window is issued
    /// once less than half a window is left ahead of the reader, and each new window is
    /// twice the last, up to `max_window` bytes.
    pub(crate) fn next(
        &mut self,
        offset: u64,
        len: u64,
        data_size: u64,
        max_window: u64,
    ) -> Option<(u64, u64)> {
        let end = offset.saturating_add(len);
        let sequential = self.last_end.is_some_and(|last_end| {
            offset >= last_end.saturating_sub(SEQUENTIAL_SLACK)
                && offset <= last_end.saturating_add(SEQUENTIAL_SLACK)
        });
        if !sequential || max_window == 0 {
            self.last_end = Some(end);
            self.window = 0;
            self.issued_end = end;
            return None;
        }
        let end = end.max(self.last_end.unwrap_or(end));
        self.last_end = Some(end);
        if self.window == 0 {
            self.window = INITIAL_WINDOW.min(max_window);
        } else if self.issued_end >= end.saturating_add(self.window / 2) {
            return None;
        } else {
            self.window = self.window.saturating_mul(2).min(max_window);
        }

        let start = self.issued_end.max(end);
        let target = end.saturating_add(self.window).min(data_size);
        if start >= target {
            return None;
        }
        self.issued_end = target;
        Some((start, target - start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    /// One read: step name, offset, length and the read-ahead range it should start.
    type Step = (&'static str, u64, u64, Option<(u64, u64)>);

    #[test]
    fn read_ahead_sequences() {
        // (offset, len, expected range) in order, on a 100 MiB layer, 4 MiB max window.
        let steps: &[Step] = &[
            ("first read", 0, 128 * 1024, None),
            (
                "second read starts the window",
                128 * 1024,
                128 * 1024,
                Some((256 * 1024, 512 * 1024)),
            ),
            ("window ahead", 256 * 1024, 128 * 1024, None),
            ("window half used", 384 * 1024, 128 * 1024, None),
            (
                "window grows",
                512 * 1024,
                128 * 1024,
                Some((768 * 1024, 896 * 1024)),
            ),
            ("random read resets", 50 * MIB, 4096, None),
            (
                "next sequential read",
                50 * MIB + 4096,
                4096,
                Some((50 * MIB + 8192, 512 * 1024)),
            ),
            ("read near the end clamps", 100 * MIB - 8192, 4096, None),
            ("last read", 100 * MIB - 4096, 4096, None),
        ];
        let mut state = ReadAhead::default();
        for (name, offset, len, expected) in steps {
            assert_eq!(
                state.next(*offset, *len, 100 * MIB, 4 * MIB),
                *expected,
                "step {name}"
            );
        }
    }

    #[test]
    fn window_stops_at_max() {
        let mut state = ReadAhead::default();
        let mut offset = 0;
        let mut largest = 0;
        for _ in 0..200 {
            if let Some((_, len)) = state.next(offset, MIB, 1 << 40, 8 * MIB) {
                largest = largest.max(len);
            }
            offset += MIB;
        }
        assert!(largest <= 8 * MIB, "largest read-ahead {largest}");
        assert!(largest >= 4 * MIB, "the window grew: {largest}");
    }

    #[test]
    fn zero_max_disables() {
        let mut state = ReadAhead::default();
        assert_eq!(state.next(0, 10, 100, 0), None);
        assert_eq!(state.next(10, 10, 100, 0), None);
    }
}
