//! `kubekms envelope`: show how a value read from etcd is encrypted.

use anyhow::Context;

/// Reads the raw value on standard input and prints its envelope as JSON.
pub fn run() -> anyhow::Result<()> {
    let mut value = Vec::new();
    std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut value)
        .context("failed to read standard input")?;
    let envelope = kubekms::envelope::parse(&value)?;
    println!("{}", serde_json::to_string_pretty(&envelope)?);
    Ok(())
}
