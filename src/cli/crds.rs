//! `kubekms crds`: print the CustomResourceDefinitions, the content of crds/.

use std::io::Write;

use anyhow::Context;

/// Prints the CRDs as YAML.
pub fn run() -> anyhow::Result<()> {
    let yaml = kubekms::api::crds_yaml().context("failed to render the CRDs")?;
    std::io::stdout().write_all(yaml.as_bytes()).context("failed to write the CRDs")?;
    Ok(())
}
