use tqkv::codebook::{centroids_f64, gaussian_distortion, lloyd_max, Codebook, SUPPORTED_BITS};

/// (bits, outermost, innermost positive centroid, Gaussian distortion) of converged Lloyd-Max.
const CONVERGED: [(u32, f64, f64, f64); 6] = [
    (2, 1.5104176, 0.4527800, 0.1174818),
    (3, 2.1519457, 0.2450942, 0.0345478),
    (4, 2.7325896, 0.1283950, 0.0095010),
    (5, 3.2607325, 0.0658897, 0.0025047),
    (6, 3.7441013, 0.0334095, 0.00064424),
    (8, 4.6035356, 0.0084462, 0.000041185),
];

#[test]
fn fresh_lloyd_max_reaches_the_converged_centroids() {
    for (bits, outer, inner, _) in CONVERGED {
        let c = lloyd_max(bits).unwrap();
        assert_eq!(c.len(), 1 << bits);
        assert!(
            (c[c.len() - 1] - outer).abs() < 1e-6,
            "{bits}-bit outer {}",
            c[c.len() - 1]
        );
        assert!(
            (c[c.len() / 2] - inner).abs() < 1e-6,
            "{bits}-bit inner {}",
            c[c.len() / 2]
        );
    }
}

#[test]
fn embedded_tables_equal_a_fresh_computation() {
    for bits in SUPPORTED_BITS {
        let fresh = lloyd_max(bits).unwrap();
        let embedded = centroids_f64(bits).unwrap();
        for (a, b) in fresh.iter().zip(embedded) {
            assert!((a - b).abs() < 1e-12, "{bits}-bit: fresh {a} embedded {b}");
        }
    }
}

#[test]
fn gaussian_distortion_matches_lloyd_max_theory() {
    for (bits, _, _, dist) in CONVERGED {
        let got = gaussian_distortion(centroids_f64(bits).unwrap());
        assert!(
            (got - dist).abs() / dist < 2e-5,
            "{bits}-bit distortion {got}, want {dist}"
        );
    }
}

#[test]
fn codebooks_are_symmetric_and_ascending() {
    for bits in SUPPORTED_BITS {
        let c = centroids_f64(bits).unwrap();
        let n = c.len();
        assert!(c.windows(2).all(|w| w[0] < w[1]));
        for i in 0..n / 2 {
            assert_eq!(c[i], -c[n - 1 - i]);
        }
    }
}

#[test]
fn index_of_ties_go_to_the_lower_index() {
    let cb = Codebook::new(4).unwrap();
    assert_eq!(cb.index_of(0.0), 7, "0 is the middle boundary");
    for (i, &t) in cb.boundaries.iter().enumerate() {
        assert_eq!(cb.index_of(t) as usize, i);
        assert_eq!(cb.index_of(t.next_up()) as usize, i + 1);
    }
    assert_eq!(cb.index_of(-100.0), 0);
    assert_eq!(cb.index_of(100.0), 15);
}

#[test]
fn unsupported_bits_are_rejected_with_the_value() {
    for bits in [0, 1, 7, 9, 16] {
        let e = Codebook::new(bits).unwrap_err().to_string();
        assert!(e.contains(&bits.to_string()), "{e}");
        assert!(lloyd_max(bits).is_err());
    }
}
