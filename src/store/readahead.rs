//! Sequential read detection per layer and the read-ahead window it grows, in the manner
//! of the kernel's page cache read-ahead: the window doubles while reads stay sequential.

/// Distance in bytes a read may start before or after the end of the previous one and
/// still count as sequential. Clients keep several requests in flight, so consecutive
/// requests can arrive slightly out of order.
const SEQUENTIAL_SLACK: u64 = 256 * 1024;

/// First read-ahead window once a second sequential read is seen.
const INITIAL_WINDOW: u64 = 512 * 1024;

/// Sequential streams tracked per layer. A client with several connections reads
/// several places of a layer at once (nbdcopy opens four when the server allows
/// multi-conn), so each place gets its own stream and window.
const MAX_STREAMS: usize = 8;

/// One sequential stream: where its reader is and what was asked for ahead of it.
#[derive(Debug, Default, Clone, Copy)]
struct Stream {
    /// End of the stream's previous read in the layer's data space.
    last_end: u64,
    /// Current window size in bytes; 0 until the stream's second read.
    window: u64,
    /// End of the data range read-ahead already asked for.
    issued_end: u64,
    /// Read count when the stream was last used, to replace the oldest one.
    used: u64,
}

/// One layer's read-ahead state: up to [`MAX_STREAMS`] sequential streams.
#[derive(Debug, Default)]
pub(crate) struct ReadAhead {
    streams: Vec<Stream>,
    reads: u64,
}

impl ReadAhead {
    /// Records a read of `offset..offset + len` and returns the data range to fetch ahead,
    /// if any: the window after the read, clamped to `data_size`. A read continues the
    /// stream whose previous read ended near its start, or starts a new stream in place
    /// of the least recently used one. A stream's first window is issued on its second
    /// read. A new window is issued once less than half a window is left ahead of the
    /// reader, and each new window is twice the last, up to `max_window` bytes.
    pub(crate) fn next(
        &mut self,
        offset: u64,
        len: u64,
        data_size: u64,
        max_window: u64,
    ) -> Option<(u64, u64)> {
        self.reads += 1;
        let end = offset.saturating_add(len);
        let near = |stream: &Stream| {
            offset >= stream.last_end.saturating_sub(SEQUENTIAL_SLACK)
                && offset <= stream.last_end.saturating_add(SEQUENTIAL_SLACK)
        };
        let Some(stream) = self.streams.iter_mut().find(|stream| near(stream)) else {
            let fresh = Stream {
                last_end: end,
                window: 0,
                issued_end: end,
                used: self.reads,
            };
            if self.streams.len() < MAX_STREAMS {
                self.streams.push(fresh);
            } else if let Some(oldest) = self.streams.iter_mut().min_by_key(|stream| stream.used) {
                *oldest = fresh;
            }
            return None;
        };
        stream.used = self.reads;
        if max_window == 0 {
            stream.last_end = end;
            return None;
        }
        let end = end.max(stream.last_end);
        stream.last_end = end;
        if stream.window == 0 {
            stream.window = INITIAL_WINDOW.min(max_window);
        } else if stream.issued_end >= end.saturating_add(stream.window / 2) {
            return None;
        } else {
            stream.window = stream.window.saturating_mul(2).min(max_window);
        }

        let start = stream.issued_end.max(end);
        let target = end.saturating_add(stream.window).min(data_size);
        if start >= target {
            return None;
        }
        stream.issued_end = target;
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
    fn interleaved_streams_keep_their_windows() {
        // Four readers, each 64 MiB apart, take turns with 256 KiB reads, as nbdcopy's
        // four connections do; each must keep growing its own window.
        let mut state = ReadAhead::default();
        let starts = [0, 64 * MIB, 128 * MIB, 192 * MIB];
        let mut issued = [0u64; 4];
        for step in 0..64u64 {
            for (reader, start) in starts.iter().enumerate() {
                let offset = start + step * 256 * 1024;
                if let Some((ahead, len)) = state.next(offset, 256 * 1024, 1 << 40, 8 * MIB) {
                    assert!(
                        ahead >= offset,
                        "reader {reader} read-ahead behind its reads"
                    );
                    issued[reader] += len;
                }
            }
        }
        for (reader, bytes) in issued.iter().enumerate() {
            assert!(
                *bytes >= 16 * MIB,
                "reader {reader} got {bytes} bytes of read-ahead"
            );
        }
    }

    #[test]
    fn oldest_stream_replaced() {
        let mut state = ReadAhead::default();
        // Fill every slot with a stream that read once, then start one more.
        for stream in 0..=MAX_STREAMS as u64 {
            assert_eq!(state.next(stream * 100 * MIB, 4096, 1 << 40, 8 * MIB), None);
        }
        assert_eq!(state.streams.len(), MAX_STREAMS);
        // The first stream was replaced, so its next read starts a stream again.
        assert_eq!(state.next(4096, 4096, 1 << 40, 8 * MIB), None);
        // The newest one kept its place and continues.
        let newest = MAX_STREAMS as u64 * 100 * MIB;
        assert!(state.next(newest + 4096, 4096, 1 << 40, 8 * MIB).is_some());
    }

    #[test]
    fn zero_max_disables() {
        let mut state = ReadAhead::default();
        assert_eq!(state.next(0, 10, 100, 0), None);
        assert_eq!(state.next(10, 10, 100, 0), None);
    }
}
