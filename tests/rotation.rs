mod common;
use common::Gauss;
use tqkv::rotation::{fwht, splitmix64, sum_squares_pairwise, Rotation};

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

#[test]
fn splitmix64_matches_the_reference_sequence() {
    // First outputs of splitmix64 seeded with 1234567 (reference values of the published algorithm).
    let mut s = 1234567u64;
    let got: Vec<u64> = (0..3).map(|_| splitmix64(&mut s)).collect();
    assert_eq!(
        got,
        [
            6457827717110365317,
            3203168211198807973,
            9817491932198370423
        ]
    );
}

#[test]
fn fwht_equals_the_sylvester_matrix_product() {
    let n = 32;
    let mut g = Gauss::new(1);
    let x = g.vec(n);
    let mut y = x.clone();
    fwht(&mut y);
    for (i, yi) in y.iter().enumerate() {
        // Sylvester H[i][j] = (-1)^popcount(i & j)
        let want: f64 = (0..n)
            .map(|j| {
                if (i & j).count_ones() % 2 == 0 {
                    x[j] as f64
                } else {
                    -x[j] as f64
                }
            })
            .sum();
        assert!((*yi as f64 - want).abs() < 1e-4, "row {i}: {yi} vs {want}");
    }
}

#[test]
fn rotation_is_orthogonal_and_inverse_undoes_it() {
    let mut g = Gauss::new(2);
    for d in [32, 64, 128, 256, 512, 1024] {
        let r = Rotation::new(d, 99).unwrap();
        let (a, b) = (g.vec(d), g.vec(d));
        let (mut ra, mut rb) = (a.clone(), b.clone());
        r.forward(&mut ra);
        r.forward(&mut rb);
        let scale = dot(&a, &a).sqrt() * dot(&b, &b).sqrt();
        assert!(
            (dot(&ra, &rb) - dot(&a, &b)).abs() / scale < 1e-5,
            "d={d} inner product"
        );
        assert!(
            (dot(&ra, &ra) - dot(&a, &a)).abs() / dot(&a, &a) < 1e-5,
            "d={d} norm"
        );
        r.inverse(&mut ra);
        for (x, y) in a.iter().zip(&ra) {
            assert!((x - y).abs() < 1e-5, "d={d}: inverse {y} vs {x}");
        }
    }
}

#[test]
fn signs_come_from_bit_63_of_splitmix64() {
    let r = Rotation::new(64, 7).unwrap();
    let mut s = 7u64;
    for &sign in r.signs() {
        let want = if splitmix64(&mut s) >> 63 == 1 {
            -1.0
        } else {
            1.0
        };
        assert_eq!(sign, want);
    }
    let negatives = r.signs().iter().filter(|&&s| s < 0.0).count();
    assert!(
        (16..=48).contains(&negatives),
        "signs look unbalanced: {negatives}/64"
    );
    assert_ne!(
        Rotation::new(64, 8).unwrap().signs(),
        r.signs(),
        "seed must matter"
    );
}

#[test]
fn pairwise_sum_of_squares_follows_the_adjacent_pair_tree() {
    let x = [1.0f32, 1e8, -1.0, 3.0];
    // ((1 + 1e16) + (1 + 9)) in f32
    let want = (1.0f32 + 1e16f32) + (1.0f32 + 9.0f32);
    assert_eq!(sum_squares_pairwise(&x), want);
}

#[test]
fn non_power_of_two_head_dim_is_rejected() {
    let e = Rotation::new(96, 1).unwrap_err().to_string();
    assert!(e.contains("96"), "{e}");
}
