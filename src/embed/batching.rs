//! Token-budget batching (SPEC §2.5): items sorted by token count fill each batch up to `--batch-tokens`
//! real tokens. Sequences are packed back to back (varlen), so the budget counts tokens, not padded slots.
//!
//! Sorting happens within a window of items (the job's chunk): long jobs never hold every tokenised item at
//! once, and within a window of tens of thousands of items the length mix is already well sorted.

/// Splits items with the given token counts into batches of indices; deterministic for the same input.
/// Each batch holds at most `budget` tokens, except a single item longer than the budget (which the caller
/// prevents by requiring `--batch-tokens ≥ --max-tokens`).
pub fn plan(lengths: &[usize], budget: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    // Stable sort by length: equal lengths keep item order, so a rerun plans the same batches.
    order.sort_by_key(|&i| lengths[i]);
    let mut batches = Vec::new();
    let mut current = Vec::new();
    let mut tokens = 0;
    for i in order {
        if !current.is_empty() && tokens + lengths[i] > budget {
            batches.push(std::mem::take(&mut current));
            tokens = 0;
        }
        tokens += lengths[i];
        current.push(i);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_the_budget_and_cover_every_item_once() {
        let lengths: Vec<usize> = (0..500).map(|i| 1 + (i * 7919) % 120).collect();
        let batches = plan(&lengths, 1000);
        let mut seen = vec![false; lengths.len()];
        let mut previous_max = 0;
        for batch in &batches {
            let total: usize = batch.iter().map(|&i| lengths[i]).sum();
            assert!(total <= 1000);
            for &i in batch {
                assert!(!seen[i]);
                seen[i] = true;
                assert!(lengths[i] >= previous_max, "batches are in ascending length order");
            }
            previous_max = batch.iter().map(|&i| lengths[i]).max().unwrap();
        }
        assert!(seen.iter().all(|&s| s));
        // Greedy filling wastes at most one item's worth of budget per batch.
        for pair in batches.windows(2) {
            let total: usize = pair[0].iter().map(|&i| lengths[i]).sum();
            assert!(total + lengths[pair[1][0]] > 1000);
        }
    }

    #[test]
    fn ties_keep_item_order_and_oversized_items_stand_alone() {
        assert_eq!(plan(&[5, 3, 5, 3], 6), vec![vec![1, 3], vec![0], vec![2]]);
        assert_eq!(plan(&[10, 1], 4), vec![vec![1], vec![0]]);
        assert!(plan(&[], 4).is_empty());
    }
}
