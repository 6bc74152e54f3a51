//! `kubekms encrypt` and `kubekms decrypt`: their flags, and the envelope encryption of a
//! file through the key API that they run.

use std::path::PathBuf;

use super::args::KeyApiArgs;

/// A `key=value` pair of an encryption context.
fn context_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

#[derive(clap::Args)]
pub struct EncryptArgs {
    #[command(flatten)]
    key_api: KeyApiArgs,
    /// The key, as NAMESPACE/NAME or keyId.
    #[arg(long)]
    key: String,
    /// An encryption-context pair, bound to the data key (repeatable).
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = context_pair)]
    context: Vec<(String, String)>,
    /// What to encrypt ("-" for standard input).
    #[arg(long = "in", value_name = "FILE", default_value = "-")]
    input: PathBuf,
    #[command(flatten)]
    output: Output,
}

#[derive(clap::Args)]
pub struct DecryptArgs {
    #[command(flatten)]
    key_api: KeyApiArgs,
    /// A pair the file's encryption context must contain (repeatable).
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = context_pair)]
    context: Vec<(String, String)>,
    /// Require the file to be under this key (NAMESPACE/NAME or keyId).
    #[arg(long)]
    key: Option<String>,
    /// What to decrypt ("-" for standard input).
    #[arg(long = "in", value_name = "FILE", default_value = "-")]
    input: PathBuf,
    #[command(flatten)]
    output: Output,
}

/// Where encrypt and decrypt write, and whether they say how much.
#[derive(clap::Args)]
struct Output {
    /// Where to write ("-" for standard output).
    #[arg(long = "out", value_name = "FILE", default_value = "-")]
    file: PathBuf,
    /// Print the byte count and this process's peak memory to standard error.
    #[arg(long)]
    verbose: bool,
}

impl Output {
    fn report(&self, what: &str, bytes: u64) {
        if self.verbose {
            let peak = kubekms::client::peak_memory_kib()
                .map_or_else(|| "unknown".to_owned(), |k| format!("{k} KiB"));
            eprintln!("{what} {bytes} bytes; peak memory {peak}");
        }
    }
}

impl EncryptArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let mut client = self.key_api.connect().await?;
        let context = self.context.into_iter().collect();
        let n =
            kubekms::client::encrypt_file(&mut client, &self.key, context, &self.input, &self.output.file)
                .await?;
        self.output.report("encrypted", n);
        Ok(())
    }
}

impl DecryptArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let mut client = self.key_api.connect().await?;
        let expected = self.context.into_iter().collect();
        let key = self.key.unwrap_or_default();
        let n = kubekms::client::decrypt_file(&mut client, &expected, &key, &self.input, &self.output.file)
            .await?;
        self.output.report("decrypted", n);
        Ok(())
    }
}
