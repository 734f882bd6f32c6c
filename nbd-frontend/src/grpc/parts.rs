//! Splitting a byte range of a volume at chunk boundaries. In a cluster every chunk belongs to
//! its own chunk group, led by its own node, so a request that straddles a boundary becomes one
//! request per chunk. Pure functions, property-tested.

use std::ops::Range;

use tern_common::CHUNK_SIZE;

/// The piece of a request that lies in one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Part {
    /// Index of the chunk within the volume.
    pub chunk: u64,
    /// Volume offset of the piece's first byte.
    pub offset: u64,
    pub len: u64,
}

impl Part {
    /// Where the piece sits in a buffer holding the request, which starts at volume offset
    /// `base`.
    pub fn within(&self, base: u64) -> Range<usize> {
        let start = (self.offset - base) as usize;
        start..start + self.len as usize
    }
}

/// The pieces of `[offset, offset + len)` that each lie within one chunk, in order. An empty
/// range yields one empty piece, so the request still reaches a node, which judges it.
pub(crate) fn chunk_parts(offset: u64, len: u64) -> impl Iterator<Item = Part> {
    let end = offset.saturating_add(len);
    let mut pos = offset;
    let mut first = true;
    std::iter::from_fn(move || {
        if pos >= end && !first {
            return None;
        }
        first = false;
        let chunk = pos / CHUNK_SIZE;
        let stop = end.min(chunk.saturating_add(1).saturating_mul(CHUNK_SIZE));
        let part = Part { chunk, offset: pos, len: stop - pos };
        pos = stop;
        Some(part)
    })
}

/// The piece of `[offset, offset + len)` in the chunk of its first byte.
pub(crate) fn first_part(offset: u64, len: u64) -> Part {
    let chunk = offset / CHUNK_SIZE;
    let stop = offset.saturating_add(len).min(chunk.saturating_add(1).saturating_mul(CHUNK_SIZE));
    Part { chunk, offset, len: stop - offset }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const C: u64 = CHUNK_SIZE;

    fn parts(offset: u64, len: u64) -> Vec<Part> {
        chunk_parts(offset, len).collect()
    }

    #[test]
    fn a_range_inside_one_chunk_is_one_part() {
        assert_eq!(parts(4096, 8192), vec![Part { chunk: 0, offset: 4096, len: 8192 }]);
        assert_eq!(parts(C, C), vec![Part { chunk: 1, offset: C, len: C }]);
        assert_eq!(parts(C - 1, 1), vec![Part { chunk: 0, offset: C - 1, len: 1 }]);
    }

    #[test]
    fn a_range_across_a_boundary_is_split_there() {
        assert_eq!(
            parts(C - 4096, 8192),
            vec![
                Part { chunk: 0, offset: C - 4096, len: 4096 },
                Part { chunk: 1, offset: C, len: 4096 },
            ]
        );
        // A 4 GiB trim spans 65 chunks when it starts mid-chunk.
        assert_eq!(parts(C / 2, 64 * C).len(), 65);
    }

    #[test]
    fn an_empty_range_is_one_empty_part() {
        assert_eq!(parts(C, 0), vec![Part { chunk: 1, offset: C, len: 0 }]);
    }

    #[test]
    fn parts_locate_their_bytes_in_the_request_buffer() {
        let p = parts(C - 4096, 8192);
        assert_eq!(p[0].within(C - 4096), 0..4096);
        assert_eq!(p[1].within(C - 4096), 4096..8192);
    }

    #[test]
    fn first_part_stops_at_the_chunk_end() {
        assert_eq!(first_part(C - 512, 1 << 30), Part { chunk: 0, offset: C - 512, len: 512 });
        assert_eq!(first_part(3 * C, 4096), Part { chunk: 3, offset: 3 * C, len: 4096 });
    }

    proptest! {
        /// Parts are non-empty, contiguous, each within one chunk, and cover the range exactly.
        #[test]
        fn parts_tile_the_range(offset in 0u64..(1 << 46), len in 1u64..(1 << 33)) {
            let ps = parts(offset, len);
            prop_assert_eq!(ps[0].offset, offset);
            prop_assert_eq!(ps[0], first_part(offset, len));
            let mut pos = offset;
            for p in &ps {
                prop_assert_eq!(p.offset, pos);
                prop_assert!(p.len > 0);
                prop_assert_eq!(p.chunk, p.offset / C);
                prop_assert_eq!((p.offset + p.len - 1) / C, p.chunk);
                pos += p.len;
            }
            prop_assert_eq!(pos, offset + len);
            prop_assert_eq!(ps.len() as u64, (offset + len - 1) / C - offset / C + 1);
        }
    }
}
