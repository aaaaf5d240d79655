//! Presets: names, bits, options and true bits per value.

use tqkv::{CacheOptions, KvCache, Preset, Src, TqError};

#[test]
fn every_preset_parses_from_its_name_in_any_case() {
    for p in Preset::ALL {
        assert_eq!(p.name().parse::<Preset>().unwrap(), p);
        assert_eq!(p.name().to_uppercase().parse::<Preset>().unwrap(), p);
        assert_eq!(p.to_string(), p.name());
    }
    let names: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
    assert_eq!(names, ["tq8", "k8v4", "tq6", "k6v4", "tq4", "tq3"]);
}

#[test]
fn an_unknown_preset_names_the_known_ones() {
    match "tq5".parse::<Preset>() {
        Err(TqError::InvalidArgument(m)) => {
            assert!(m.contains("tq5") && m.contains("k6v4"), "{m}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn presets_have_their_bits_and_the_default_options() {
    let bits: Vec<(u32, u32)> = Preset::ALL.iter().map(|p| p.bits()).collect();
    assert_eq!(bits, [(8, 8), (8, 4), (6, 6), (6, 4), (4, 4), (3, 3)]);
    for p in Preset::ALL {
        assert_eq!(p.options(), CacheOptions::default());
        let l = p.layout(8, 128, 64).unwrap();
        assert_eq!((l.k_bits, l.v_bits), p.bits());
    }
    let d = CacheOptions::default();
    assert!(d.center_keys && d.key_mean.is_none());
    assert_eq!((d.window, d.sinks), (32, 1));
}

#[test]
fn bits_per_value_counts_every_byte_of_the_cache() {
    // tq4, 8 kv heads, head_dim 128, 4096 tokens: per head and token 64 + 64 index bytes and
    // two f32 norms; 33 exact tokens of 2 × 128 f16; μ and R μ; codec tables.
    let (h, d, t) = (8usize, 128usize, 4096usize);
    let packed = h * t * (64 + 64 + 8);
    let exact = h * 33 * 2 * d * 2;
    let mean = 2 * h * d * 4;
    let tables = 4 * (16 + 15 + 16 + 15 + d);
    let bytes = (packed + exact + mean + tables) as f64;
    let want = bytes * 8.0 / (2 * h * t * d) as f64;
    let got = Preset::Tq4.bits_per_value(h, d, t).unwrap();
    assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    assert!(got > 4.25 && got < 4.4, "{got}");
    // Longer contexts amortize the exact tokens: fewer bits per value.
    assert!(Preset::Tq4.bits_per_value(h, d, 32768).unwrap() < got);
}

#[test]
fn bits_per_value_rejects_zero_sizes() {
    for (h, d, t) in [(0, 128, 10), (8, 0, 10), (8, 128, 0)] {
        assert!(matches!(
            Preset::Tq8.bits_per_value(h, d, t),
            Err(TqError::InvalidArgument(_))
        ));
    }
}

#[test]
fn a_preset_cache_appends_and_reports_its_memory() {
    let p = Preset::K8V4;
    let mut c = KvCache::with_options(p.layout(2, 64, 100).unwrap(), p.options()).unwrap();
    let x: Vec<f32> = (0..50 * 2 * 64).map(|i| (i as f32 * 0.01).sin()).collect();
    c.append(Src::F32(&x), Src::F32(&x)).unwrap();
    assert_eq!((c.len(), c.frontier()), (50, 18));
    let bits = c.memory_bytes() as f64 * 8.0 / (2 * 2 * 100 * 64) as f64;
    assert!((bits - p.bits_per_value(2, 64, 100).unwrap()).abs() < 1e-12);
}
