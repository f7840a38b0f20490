//! Generated users for the demo: each has one or two favourite categories and a few favourite brands, and
//! picks most items from them, so history predicts targets the way real behaviour does — through content.

use super::catalogue::{GeneratedItem, category_count};
use crate::data::interactions::SequenceRecord;
use rand::prelude::*;
use rand_chacha::ChaCha8Rng;

/// `count` users over `items`, each with a history of 8–40 items and 4–12 targets, deterministic per seed.
pub fn generate(items: &[GeneratedItem], count: usize, seed: u64) -> Vec<SequenceRecord> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x005e_ed0f_05e5);
    let mut by_category: Vec<Vec<usize>> = vec![Vec::new(); category_count()];
    for (row, item) in items.iter().enumerate() {
        by_category[item.category].push(row);
    }
    (0..count)
        .map(|u| {
            let favourites: Vec<usize> =
                (0..rng.random_range(1..=2)).map(|_| rng.random_range(0..category_count())).collect();
            let brand_of = |row: usize| items[row].record["brand"].as_str().unwrap_or_default().to_string();
            // A taste for a few brands within the favourite categories sharpens the signal beyond category.
            let liked: Vec<String> = (0..3)
                .filter_map(|_| {
                    let pool = &by_category[favourites[rng.random_range(0..favourites.len())]];
                    pool.choose(&mut rng).map(|&r| brand_of(r))
                })
                .collect();
            let pick = |rng: &mut ChaCha8Rng| -> usize {
                if rng.random_bool(0.85) {
                    let pool = &by_category[favourites[rng.random_range(0..favourites.len())]];
                    let preferred: Vec<usize> =
                        pool.iter().copied().filter(|&r| liked.contains(&brand_of(r))).collect();
                    let source = if !preferred.is_empty() && rng.random_bool(0.6) { &preferred } else { pool };
                    if let Some(&row) = source.choose(rng) {
                        return row;
                    }
                }
                rng.random_range(0..items.len())
            };
            let history: Vec<usize> = (0..rng.random_range(8..=40)).map(|_| pick(&mut rng)).collect();
            let targets: Vec<usize> = (0..rng.random_range(4..=12)).map(|_| pick(&mut rng)).collect();
            let id = |row: &usize| items[*row].record["id"].as_str().unwrap_or_default().to_string();
            SequenceRecord {
                user: format!("user-{u}"),
                history: history.iter().map(id).collect(),
                targets: targets.iter().map(id).collect(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_deterministic_and_lean_towards_their_categories() {
        let items = super::super::catalogue::generate(500, 1);
        let a = generate(&items, 30, 2);
        assert_eq!(a, generate(&items, 30, 2));
        assert_ne!(a, generate(&items, 30, 3));
        let row = |id: &str| id.trim_start_matches("item-").parse::<usize>().unwrap();
        let mut shared = 0;
        let mut total = 0;
        for user in &a {
            assert!((8..=40).contains(&user.history.len()) && (4..=12).contains(&user.targets.len()));
            let seen: std::collections::HashSet<usize> = user.history.iter().map(|h| items[row(h)].category).collect();
            for t in &user.targets {
                total += 1;
                shared += seen.contains(&items[row(t)].category) as usize;
            }
        }
        assert!(shared as f64 > 0.8 * total as f64, "{shared}/{total} targets share a category with the history");
    }
}
