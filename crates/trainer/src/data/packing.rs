//! Packing (`data.packing = true`): several supervised examples per row instead of one padded
//! example per row, so short examples stop paying for a row of padding.
//!
//! Examples are placed best-fit decreasing (longest first, each into the row with the least
//! room that holds it, a new row when none does), the usual bin packing of SFT trainers (TRL's
//! `bfd`): rows come out nearly full and the placement is a function of the lengths alone.
//! In a packed row, example `k` (1-based) has segment id `k` on each of its tokens and
//! positions `0, 1, ...` from its first token; padding has segment 0. The label of each
//! example's first token is [`IGNORE_INDEX`], so no token is learned from the example before
//! it; with the model's segment mask (a token sees earlier tokens of its own segment only) and
//! restarted positions, every example's loss terms are those it has alone in a row.

use std::collections::BTreeSet;

use super::example::{Example, IGNORE_INDEX};

/// Packs unpadded examples (each at most `seq_len` long) into rows of `seq_len`, padded with
/// `pad`. Empty examples are dropped.
pub fn pack(examples: Vec<Example>, seq_len: usize, pad: i64) -> Vec<Example> {
    let mut order: Vec<usize> = (0..examples.len())
        .filter(|&i| !examples[i].ids.is_empty())
        .collect();
    // Longest first; equal lengths in file order (a stable sort), so packing is deterministic.
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].ids.len()));
    let mut rows: Vec<Vec<usize>> = Vec::new();
    // (room left, row): the row with the least room that fits is the first at or above `len`.
    let mut room: BTreeSet<(usize, usize)> = BTreeSet::new();
    for i in order {
        let len = examples[i].ids.len().min(seq_len);
        match room.range((len, 0)..).next().copied() {
            Some((left, row)) => {
                room.remove(&(left, row));
                rows[row].push(i);
                room.insert((left - len, row));
            }
            None => {
                rows.push(vec![i]);
                room.insert((seq_len - len, rows.len() - 1));
            }
        }
    }
    rows.into_iter()
        .map(|members| {
            let mut row = Example {
                ids: Vec::with_capacity(seq_len),
                labels: Vec::with_capacity(seq_len),
                segments: Some(Vec::with_capacity(seq_len)),
                positions: Some(Vec::with_capacity(seq_len)),
            };
            for (k, &i) in members.iter().enumerate() {
                let e = &examples[i];
                let len = e.ids.len().min(seq_len);
                let start = row.ids.len();
                row.ids.extend_from_slice(&e.ids[..len]);
                row.labels.extend_from_slice(&e.labels[..len]);
                row.labels[start] = IGNORE_INDEX;
                if let (Some(s), Some(p)) = (row.segments.as_mut(), row.positions.as_mut()) {
                    s.extend(std::iter::repeat_n(k as u32 + 1, len));
                    p.extend(0..len as i64);
                }
            }
            row.pad_to(seq_len, pad);
            row
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(len: usize, base: i64) -> Example {
        let ids: Vec<i64> = (0..len as i64).map(|i| base + i).collect();
        Example::new(ids.clone(), ids)
    }

    #[test]
    fn rows_hold_examples_with_segments_positions_and_boundary_labels() {
        let examples = vec![ex(3, 10), ex(5, 20), ex(2, 30), ex(4, 40)];
        let rows = pack(examples.clone(), 8, -1);
        // Best fit decreasing: 5 opens row 0 (3 left), 4 opens row 1 (4 left), 3 fills row 0,
        // 2 goes to row 1 (2 left).
        assert_eq!(rows.len(), 2);
        let r0 = &rows[0];
        assert_eq!(r0.ids, vec![20, 21, 22, 23, 24, 10, 11, 12]);
        assert_eq!(r0.labels, vec![-100, 21, 22, 23, 24, -100, 11, 12]);
        assert_eq!(r0.segments.as_deref(), Some(&[1, 1, 1, 1, 1, 2, 2, 2][..]));
        assert_eq!(r0.positions.as_deref(), Some(&[0, 1, 2, 3, 4, 0, 1, 2][..]));
        let r1 = &rows[1];
        assert_eq!(r1.ids, vec![40, 41, 42, 43, 30, 31, -1, -1]);
        assert_eq!(r1.labels, vec![-100, 41, 42, 43, -100, 31, -100, -100]);
        assert_eq!(r1.segments.as_deref(), Some(&[1, 1, 1, 1, 2, 2, 0, 0][..]));
        assert_eq!(r1.positions.as_deref(), Some(&[0, 1, 2, 3, 0, 1, 0, 0][..]));
        // Every example's learned tokens survive: those it has alone in a row.
        let learned = |rows: &[Example]| rows.iter().map(Example::target_tokens).sum::<usize>();
        assert_eq!(learned(&rows), learned(&examples));
    }

    #[test]
    fn packing_is_deterministic_and_keeps_every_example() {
        let examples: Vec<Example> = (0..50)
            .map(|i| ex(1 + (i * 7) % 13, i as i64 * 100))
            .collect();
        let a = pack(examples.clone(), 16, 0);
        assert_eq!(a, pack(examples.clone(), 16, 0));
        let total: usize = examples.iter().map(|e| e.ids.len()).sum();
        let packed: usize = a
            .iter()
            .map(|r| {
                r.segments
                    .as_ref()
                    .unwrap()
                    .iter()
                    .filter(|&&s| s > 0)
                    .count()
            })
            .sum();
        assert_eq!(packed, total);
        // Nearly full rows.
        assert!(
            a.len() <= total.div_ceil(16) + 2,
            "{} rows for {total} tokens",
            a.len()
        );
        assert!(pack(vec![Example::new(vec![], vec![])], 8, 0).is_empty());
    }
}
