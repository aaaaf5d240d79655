//! Regenerates `src/codebook/tables.rs`: `cargo run --release --example gen_codebooks > src/codebook/tables.rs`.
fn main() -> Result<(), tqkv::TqError> {
    for bits in tqkv::codebook::SUPPORTED_BITS {
        let c = tqkv::codebook::lloyd_max(bits)?;
        eprintln!(
            "{bits}-bit: outer {:.7} inner {:.7} distortion {:.8e}",
            c[c.len() - 1],
            c[c.len() / 2],
            tqkv::codebook::gaussian_distortion(&c)
        );
    }
    print!("{}", tqkv::codebook::tables_source()?);
    Ok(())
}
