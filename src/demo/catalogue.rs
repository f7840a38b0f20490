//! A generated product catalogue with realistic fields, for the demo, tests and tokenizer training.
//!
//! Each category has its own nouns, adjectives, keyword pool and price range, and brands lean towards a few
//! categories, so items of one category share words: even a random-weight LLM then gives them nearby content
//! embeddings, which is what the demo's neighbours and the preference model can pick up.

use rand::prelude::*;
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

struct Category {
    name: &'static str,
    chinese: &'static str,
    nouns: &'static [&'static str],
    adjectives: &'static [&'static str],
    keywords: &'static [&'static str],
    price: (f64, f64),
}

const CATEGORIES: &[Category] = &[
    Category {
        name: "Kitchen",
        chinese: "厨房用品",
        nouns: &["Kettle", "Chef Knife", "Frying Pan", "Blender", "Cutting Board", "Stock Pot", "Toaster"],
        adjectives: &["Stainless", "Non-Stick", "Cast Iron", "Electric", "Ceramic", "Compact"],
        keywords: &["cooking", "kitchen", "dishwasher safe", "induction", "厨具", "home chef"],
        price: (9.0, 180.0),
    },
    Category {
        name: "Electronics",
        chinese: "数码电子",
        nouns: &["Headphones", "Power Bank", "Bluetooth Speaker", "USB-C Hub", "Smart Watch", "Webcam"],
        adjectives: &["Wireless", "Noise Cancelling", "Portable", "Fast Charging", "4K", "Waterproof"],
        keywords: &["bluetooth", "battery", "usb-c", "gadget", "耳机", "蓝牙", "tech"],
        price: (15.0, 400.0),
    },
    Category {
        name: "Books",
        chinese: "图书",
        nouns: &["Novel", "Cookbook", "Field Guide", "Biography", "Poetry Collection", "Atlas"],
        adjectives: &["Illustrated", "Hardcover", "Paperback", "Annotated", "Bestselling", "Classic"],
        keywords: &["reading", "literature", "history", "fiction", "小说", "gift"],
        price: (6.0, 60.0),
    },
    Category {
        name: "Outdoor",
        chinese: "户外运动",
        nouns: &["Tent", "Hiking Boots", "Sleeping Bag", "Backpack", "Trekking Poles", "Headlamp"],
        adjectives: &["Lightweight", "Waterproof", "Insulated", "Ultralight", "Rugged", "Breathable"],
        keywords: &["camping", "hiking", "trail", "mountain", "露营", "徒步", "adventure"],
        price: (12.0, 450.0),
    },
    Category {
        name: "Beauty",
        chinese: "美妆护肤",
        nouns: &["Face Serum", "Moisturiser", "Lipstick", "Sunscreen", "Hair Oil", "Cleanser"],
        adjectives: &["Hydrating", "Organic", "Fragrance-Free", "Matte", "Vitamin C", "Gentle"],
        keywords: &["skincare", "makeup", "spf", "sensitive skin", "护肤", "口红", "vegan"],
        price: (5.0, 120.0),
    },
    Category {
        name: "Toys",
        chinese: "玩具",
        nouns: &["Building Set", "Puzzle", "Plush Bear", "Race Car", "Board Game", "Doll House"],
        adjectives: &["Educational", "Wooden", "Remote Control", "Colourful", "Giant", "Magnetic"],
        keywords: &["kids", "family", "stem", "ages 6+", "积木", "益智", "fun"],
        price: (8.0, 150.0),
    },
    Category {
        name: "Music",
        chinese: "音乐",
        nouns: &["Acoustic Guitar", "Vinyl Record", "Keyboard", "Ukulele", "Drum Pad", "Microphone"],
        adjectives: &["Vintage", "Studio", "Beginner", "Live", "Remastered", "Handmade"],
        keywords: &["jazz", "rock", "classical", "recording", "吉他", "唱片", "concert"],
        price: (10.0, 900.0),
    },
    Category {
        name: "Garden",
        chinese: "园艺",
        nouns: &["Watering Can", "Pruning Shears", "Raised Bed", "Seed Kit", "Hose Reel", "Planter"],
        adjectives: &["Galvanised", "Self-Watering", "Heavy Duty", "Biodegradable", "Terracotta", "Foldable"],
        keywords: &["plants", "vegetables", "flowers", "soil", "花园", "种子", "organic"],
        price: (4.0, 220.0),
    },
];

const BRANDS: &[&str] = &[
    "Acme",
    "Northwind",
    "Bluebird",
    "Contoso",
    "Fabrikam",
    "Litware",
    "Proseware",
    "Tailspin",
    "Wingtip",
    "Adatum",
    "Lucerne",
    "Margie",
    "Alpine Ski",
    "Fourth Coffee",
    "Coho",
    "Humongous",
    "Woodgrove",
    "Trey",
    "小米",
    "华为",
];
const COLOURS: &[&str] = &["black", "white", "red", "navy", "olive", "sand", "silver", "pink", "黑色", "白色"];
const MATERIALS: &[&str] = &["steel", "cotton", "bamboo", "aluminium", "leather", "recycled plastic", "glass"];
const SIZES: &[&str] = &["S", "M", "L", "XL", "one size", "30 cm", "1.5 L", "500 ml"];

/// The category index of a generated item (kept so the demo can make users with category tastes).
pub struct GeneratedItem {
    pub record: Value,
    pub category: usize,
}

/// Number of categories the generator draws from.
pub fn category_count() -> usize {
    CATEGORIES.len()
}

/// `count` items with ids `item-0`…, deterministic for a seed.
pub fn generate(count: usize, seed: u64) -> Vec<GeneratedItem> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..count)
        .map(|i| {
            let category = rng.random_range(0..CATEGORIES.len());
            // Brands lean towards categories: brand b mostly sells categories b % n and (b + 3) % n.
            let c = &CATEGORIES[category];
            let brand_choices: Vec<usize> = (0..BRANDS.len())
                .filter(|b| b % CATEGORIES.len() == category || (b + 3) % CATEGORIES.len() == category)
                .collect();
            let brand = if rng.random_bool(0.85) {
                BRANDS[brand_choices[rng.random_range(0..brand_choices.len())]]
            } else {
                BRANDS[rng.random_range(0..BRANDS.len())]
            };
            let noun = c.nouns[rng.random_range(0..c.nouns.len())];
            let adjective = c.adjectives[rng.random_range(0..c.adjectives.len())];
            let model = format!("{}{}", (b'A' + rng.random_range(0..26u8)) as char, rng.random_range(100..999));
            let price = (rng.random_range(c.price.0..c.price.1) * 100.0).round() / 100.0;
            let keyword_count = rng.random_range(1..=4);
            let keywords: Vec<&str> = c.keywords.sample(&mut rng, keyword_count).copied().collect();
            let mut record = json!({
                "id": format!("item-{i}"),
                "title": format!("{brand} {adjective} {noun} {model}"),
                "category": if rng.random_bool(0.2) { format!("{} / {}", c.name, c.chinese) } else { c.name.to_string() },
                "brand": brand,
                "price": price,
                "keywords": keywords,
            });
            if rng.random_bool(0.7) {
                record["attributes"] = json!({
                    "colour": COLOURS[rng.random_range(0..COLOURS.len())],
                    "material": MATERIALS[rng.random_range(0..MATERIALS.len())],
                    "size": SIZES[rng.random_range(0..SIZES.len())],
                });
            }
            GeneratedItem { record, category }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_and_fields_are_filled() {
        let a = generate(50, 7);
        let b = generate(50, 7);
        let c = generate(50, 8);
        assert_eq!(a.iter().map(|i| &i.record).collect::<Vec<_>>(), b.iter().map(|i| &i.record).collect::<Vec<_>>());
        assert_ne!(a[0].record, c[0].record);
        for item in &a {
            for key in ["id", "title", "category", "brand", "price", "keywords"] {
                assert!(item.record.get(key).is_some(), "{key} missing in {}", item.record);
            }
            assert!(item.category < category_count());
        }
        let categories: std::collections::HashSet<usize> = a.iter().map(|i| i.category).collect();
        assert!(categories.len() > 4);
    }
}
