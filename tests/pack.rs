mod common;
use common::BITS;
use tqkv::pack::{pack_row, row_bytes, unpack_row};

#[test]
fn every_width_round_trips_all_index_values() {
    for bits in BITS {
        let d = 64;
        let idx: Vec<u8> = (0..d).map(|i| ((i * 37 + 5) % (1 << bits)) as u8).collect();
        let mut row = vec![0u8; row_bytes(bits, d)];
        pack_row(bits, &idx, &mut row);
        let mut back = vec![0u8; d];
        unpack_row(bits, &row, &mut back);
        assert_eq!(back, idx, "{bits}-bit");
    }
}

#[test]
fn row_bytes_per_width() {
    assert_eq!(row_bytes(2, 128), 32);
    assert_eq!(row_bytes(3, 128), 48);
    assert_eq!(row_bytes(4, 128), 64);
    for bits in [5, 6, 8] {
        assert_eq!(row_bytes(bits, 128), 128);
    }
}

#[test]
fn two_bit_puts_coordinate_4i_in_the_lowest_bits() {
    let mut row = [0u8; 1];
    pack_row(2, &[1, 2, 3, 0], &mut row);
    assert_eq!(row[0], 0b00_11_10_01);
}

#[test]
fn three_bit_is_a_little_endian_bit_stream() {
    let mut row = [0u8; 3];
    pack_row(3, &[1, 2, 3, 4, 5, 6, 7, 0], &mut row);
    let v = 1 | 2 << 3 | 3 << 6 | 4 << 9 | 5 << 12 | 6 << 15 | 7 << 18;
    assert_eq!(row, [v as u8, (v >> 8) as u8, (v >> 16) as u8]);
}

#[test]
fn four_bit_puts_the_even_coordinate_in_the_low_nibble() {
    let mut row = [0u8; 2];
    pack_row(4, &[0xA, 0x3, 0xF, 0x1], &mut row);
    assert_eq!(row, [0x3A, 0x1F]);
}

#[test]
fn byte_widths_store_one_index_per_byte() {
    for bits in [5, 6, 8] {
        let idx = [((1u32 << bits) - 1) as u8, 0, 1, 2, 3, 4, 5, 6];
        let mut row = [0u8; 8];
        pack_row(bits, &idx, &mut row);
        assert_eq!(row, idx);
    }
}
