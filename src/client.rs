//! A client of the key API for people and scripts: connection (TLS, bearer token) and the
//! envelope encryption of files behind `kubekms encrypt` and `kubekms decrypt`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use zeroize::Zeroizing;

use crate::crypto::SecretBytes;
use crate::file_envelope::{self, FileError, Header};
use crate::proto::keyapi::key_service_client::KeyServiceClient;
use crate::proto::keyapi::{DecryptRequest, GenerateDataKeyRequest};

/// Where the bearer token comes from.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// A file holding the token (a projected ServiceAccount token, for example).
    File(PathBuf),
    /// The token itself (from `KUBEKMS_TOKEN`).
    Literal(Zeroizing<String>),
    /// `kubectl create token NAME -n NAMESPACE --audience AUDIENCE`.
    Kubectl { namespace: String, name: String, audience: String },
}

/// Why the client could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("failed to read the token file {0}")]
    TokenFile(PathBuf, #[source] std::io::Error),
    #[error("failed to run kubectl create token: {0}")]
    Kubectl(String),
    #[error("the token is empty")]
    EmptyToken,
    #[error("failed to read the CA certificate {0}")]
    Ca(PathBuf, #[source] std::io::Error),
    #[error("{0:?} is not a valid server address (expected https://HOST:PORT)")]
    Address(String),
    #[error("failed to connect to {0}")]
    Connect(String, #[source] tonic::transport::Error),
    #[error("the key API refused: {}", .0.message())]
    Call(tonic::Status),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("the encryption context of the file does not match --context: {0}")]
    Context(String),
    #[error("failed to write {0}")]
    Output(PathBuf, #[source] std::io::Error),
    #[error("the encryption task failed")]
    Join(#[source] tokio::task::JoinError),
}

impl ClientError {
    /// The gRPC code behind a refused call, for the exit code.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Call(s) => Some(s.code()),
            _ => None,
        }
    }
}

impl TokenSource {
    /// Reads or obtains the token.
    pub fn token(&self) -> Result<Zeroizing<String>, ClientError> {
        let token = match self {
            TokenSource::File(path) => Zeroizing::new(
                std::fs::read_to_string(path)
                    .map_err(|e| ClientError::TokenFile(path.clone(), e))?
                    .trim()
                    .to_owned(),
            ),
            TokenSource::Literal(t) => Zeroizing::new(t.trim().to_owned()),
            TokenSource::Kubectl { namespace, name, audience } => {
                let out = std::process::Command::new("kubectl")
                    .args([
                        "create",
                        "token",
                        name,
                        "-n",
                        namespace,
                        "--audience",
                        audience,
                        "--duration",
                        "10m",
                    ])
                    .output()
                    .map_err(|e| ClientError::Kubectl(e.to_string()))?;
                if !out.status.success() {
                    return Err(ClientError::Kubectl(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
                }
                Zeroizing::new(String::from_utf8_lossy(&out.stdout).trim().to_owned())
            }
        };
        if token.is_empty() {
            return Err(ClientError::EmptyToken);
        }
        Ok(token)
    }
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// A connected, authenticated client.
pub type Client = KeyServiceClient<InterceptedService<Channel, Bearer>>;

/// Connects to `server` (https://HOST:PORT), trusting `ca` (or the system's roots when
/// `None` is given and the server's certificate chains to them).
pub async fn connect(server: &str, ca: Option<&Path>, token: &TokenSource) -> Result<Client, ClientError> {
    let channel = channel(server, ca).await?;
    let token = token.token()?;
    let value = format!("Bearer {}", token.as_str()).parse().map_err(|_| ClientError::EmptyToken)?;
    Ok(KeyServiceClient::with_interceptor(channel, Bearer(value)))
}

/// A TLS connection to `server` (https://HOST:PORT) trusting `ca`, with no token: each
/// call brings its own.
pub async fn channel(server: &str, ca: Option<&Path>) -> Result<Channel, ClientError> {
    let uri: http::Uri = server.parse().map_err(|_| ClientError::Address(server.to_owned()))?;
    if uri.scheme_str() != Some("https") || uri.host().is_none() {
        return Err(ClientError::Address(server.to_owned()));
    }
    let mut tls = ClientTlsConfig::new().domain_name(uri.host().unwrap_or_default().trim_matches(['[', ']']));
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).map_err(|e| ClientError::Ca(ca.to_owned(), e))?;
        tls = tls.ca_certificate(Certificate::from_pem(pem));
    }
    Channel::builder(uri)
        .tls_config(tls)
        .map_err(|e| ClientError::Connect(server.to_owned(), e))?
        .connect()
        .await
        .map_err(|e| ClientError::Connect(server.to_owned(), e))
}

/// Where a command reads and writes: a path, or "-" for standard input/output.
fn is_stdio(p: &Path) -> bool {
    p.as_os_str() == "-"
}

/// Writes to `out` through a temporary file renamed into place only on success, so a
/// failure never leaves a partial file; "-" streams to standard output.
fn write_output<T>(
    out: &Path,
    write: impl FnOnce(&mut dyn std::io::Write) -> Result<T, ClientError>,
) -> Result<T, ClientError> {
    if is_stdio(out) {
        let stdout = std::io::stdout();
        let mut lock = std::io::BufWriter::new(stdout.lock());
        return write(&mut lock);
    }
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let random = uuid::Uuid::new_v4().simple().to_string();
    let tmp = dir.join(format!(".{name}.kubekms-{random}.tmp"));
    let result = (|| {
        // Plaintext may be written here: private to the user, never through a symlink or
        // into an existing file.
        let file = std::os::unix::fs::OpenOptionsExt::mode(
            std::fs::OpenOptions::new().write(true).create_new(true),
            0o600,
        )
        .open(&tmp)
        .map_err(|e| ClientError::Output(tmp.clone(), e))?;
        let mut buf = std::io::BufWriter::new(file);
        let value = write(&mut buf)?;
        let file = buf.into_inner().map_err(|e| ClientError::Output(tmp.clone(), e.into_error()))?;
        file.sync_all().map_err(|e| ClientError::Output(tmp.clone(), e))?;
        std::fs::rename(&tmp, out).map_err(|e| ClientError::Output(out.to_owned(), e))?;
        Ok(value)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn open_input(input: &Path) -> Result<Box<dyn std::io::Read + Send>, ClientError> {
    if is_stdio(input) {
        Ok(Box::new(std::io::stdin()))
    } else {
        let f = std::fs::File::open(input).map_err(|e| ClientError::File(FileError::Read(e)))?;
        Ok(Box::new(std::io::BufReader::with_capacity(256 * 1024, f)))
    }
}

/// Envelope-encrypts `input` to `output` under `key` (a data key from GenerateDataKey,
/// bound to `context`). Returns the plaintext size.
pub async fn encrypt_file(
    client: &mut Client,
    key: &str,
    context: BTreeMap<String, String>,
    input: &Path,
    output: &Path,
) -> Result<u64, ClientError> {
    let response = client
        .generate_data_key(GenerateDataKeyRequest {
            key: key.to_owned(),
            encryption_context: context.clone().into_iter().collect(),
            number_of_bytes: 32,
        })
        .await
        .map_err(ClientError::Call)?
        .into_inner();
    let data_key = SecretBytes::new(response.plaintext);
    let header = Header::new(response.ciphertext_blob, context, file_envelope::DEFAULT_CHUNK)?;
    let mut reader = open_input(input)?;
    let output = output.to_owned();
    tokio::task::spawn_blocking(move || {
        write_output(&output, |w| Ok(file_envelope::encrypt(&data_key, &header, &mut reader, w)?))
    })
    .await
    .map_err(ClientError::Join)?
}

/// Decrypts what [`encrypt_file`] wrote. The encryption context comes from the file; every
/// pair of `expected` must be in it. With `expected_key`, the data key must be under that
/// key.
pub async fn decrypt_file(
    client: &mut Client,
    expected: &BTreeMap<String, String>,
    expected_key: &str,
    input: &Path,
    output: &Path,
) -> Result<u64, ClientError> {
    let mut reader = open_input(input)?;
    let (header, raw, reader) =
        tokio::task::spawn_blocking(move || Header::read(&mut reader).map(|(h, raw)| (h, raw, reader)))
            .await
            .map_err(ClientError::Join)??;
    for (k, v) in expected {
        if header.context.get(k) != Some(v) {
            return Err(ClientError::Context(format!("{k}={v} is not in the file's context")));
        }
    }
    let response = client
        .decrypt(DecryptRequest {
            ciphertext_blob: header.blob.clone(),
            encryption_context: header.context.clone().into_iter().collect(),
            key: expected_key.to_owned(),
        })
        .await
        .map_err(ClientError::Call)?
        .into_inner();
    let data_key = SecretBytes::new(response.plaintext);
    let output = output.to_owned();
    let mut reader = reader;
    tokio::task::spawn_blocking(move || {
        write_output(&output, |w| Ok(file_envelope::decrypt(&data_key, &header, &raw, &mut reader, w)?))
    })
    .await
    .map_err(ClientError::Join)?
}

/// This process's peak resident memory in KiB (Linux), for `--verbose`.
pub fn peak_memory_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()
}
