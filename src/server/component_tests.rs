//! The key API over a real socket with a real gRPC client, as workloads use it: the
//! [`KeyApi`] over an in-memory [`Directory`] of keys, grants and root-wrapped material,
//! with a scripted TokenReview, a scripted RBAC and a recording grant writer. The
//! allow/deny matrix, grants, key states, bad input, and the audit line and meter of every
//! call are proved here in seconds; the end-to-end tests keep what needs the control plane.
//!
//! The server is [`super::serve`], the production construction with its limits, over plain
//! HTTP/2 on 127.0.0.1 (the real one adds TLS, which the end-to-end tests cover), and stops
//! deterministically: `Harness::stop` cancels it and waits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use jiff::Timestamp;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use super::BackendError;
use super::auth::{Authenticator, Settings, TokenReviewer};
use super::authz::{CacheSettings, CachedRbac, RbacChecker};
use super::blob::{MAX_BLOB_LEN, MAX_CONTEXT_BYTES, MAX_CONTEXT_PAIRS, MAX_PLAINTEXT_LEN};
use super::directory::Directory;
use super::service::{CreateGrantError, GrantWriter, KeyApi, MAX_RANDOM_BYTES};
use crate::audit::AuditLimits;
use crate::crypto::{KeyMaterial, RootKey, WrapContext};
use crate::domain::{
    Constraints, Effect, Grant, GrantState, Identity, Key, KeyOperation as Op, KeyState, Origin, Policy,
    Principal, Statement, WrappedMaterial, service_account_username,
};
use crate::metering::OperationMetrics;
use crate::proto::keyapi::key_service_client::KeyServiceClient;
use crate::proto::keyapi::*;
use crate::testing::{AuditSink, CapturedUses};

/// The keyIds of the keys the tests make.
const K: &str = "6ece15cd-0195-4985-aff9-395763ad0a3b";
const SPARE: &str = "1b9d6bcd-bbfd-4b2d-9b5d-ab8dfbbd4bed";
const MINE: &str = "9f0e3c1a-5b7d-4e2f-8a6c-0d1e2f3a4b5c";
/// The keyId of an earlier key named apps/k, deleted since.
const EARLIER: &str = "2c4e6a8b-1d3f-4a5b-9c7d-8e0f1a2b3c4d";

/// Every ServiceAccount the scripted TokenReview knows, as (namespace, name).
const CALLERS: &[(&str, &str)] = &[
    ("apps", "web"),
    ("apps", "intruder"),
    ("apps", "other"),
    ("apps", "owner"),
    ("apps", "writer"),
    ("apps", "reader"),
    ("partner", "reader"),
    ("partner", "stranger"),
    ("partner", "attacker"),
];

/// The token whose review fails, as when the API server is down.
const BROKEN: &str = "token-while-the-api-server-is-down";

/// The token of ServiceAccount `namespace/name`.
fn token(namespace: &str, name: &str) -> String {
    format!("token:{namespace}:{name}")
}

fn user(namespace: &str, name: &str) -> String {
    service_account_username(namespace, name)
}

/// The scripted TokenReview: a token → identity table, for audience "kubekms" only; it
/// counts the reviews it is asked for.
struct Reviewer(HashMap<String, Identity>, Arc<AtomicUsize>);

impl Reviewer {
    fn new(reviews: Arc<AtomicUsize>) -> Reviewer {
        Reviewer(
            CALLERS
                .iter()
                .map(|(ns, name)| {
                    let identity = Identity {
                        username: user(ns, name),
                        uid: format!("uid-{ns}-{name}"),
                        groups: vec!["system:serviceaccounts".into(), format!("system:serviceaccounts:{ns}")],
                        ..Default::default()
                    };
                    (token(ns, name), identity)
                })
                .collect(),
            reviews,
        )
    }
}

#[tonic::async_trait]
impl TokenReviewer for Reviewer {
    async fn review(&self, token: &str, audiences: &[String]) -> Result<Option<Identity>, BackendError> {
        self.1.fetch_add(1, Ordering::SeqCst);
        if token == BROKEN {
            return Err(BackendError::new(std::io::Error::other(
                "dial tcp 10.96.0.1:443: connection refused",
            )));
        }
        if audiences != ["kubekms".to_owned()] {
            return Ok(None);
        }
        Ok(self.0.get(token).cloned())
    }
}

/// One SubjectAccessReview: (username, verb, namespace, name).
type Question = (String, String, String, String);

fn question(user: &str, verb: &str, namespace: &str, name: &str) -> Question {
    (user.to_owned(), verb.to_owned(), namespace.to_owned(), name.to_owned())
}

/// The scripted RBAC: allows the questions in its table, records every question asked, and
/// fails while told to (the API server is down).
#[derive(Clone, Default)]
struct Rbac(Arc<RbacState>);

#[derive(Default)]
struct RbacState {
    allowed: Mutex<Vec<Question>>,
    asked: Mutex<Vec<Question>>,
    failing: AtomicBool,
}

impl Rbac {
    fn allow(&self, user: &str, verb: &str, namespace: &str, name: &str) {
        self.0.allowed.lock().unwrap().push(question(user, verb, namespace, name));
    }

    fn fail(&self, failing: bool) {
        self.0.failing.store(failing, Ordering::SeqCst);
    }

    fn asked(&self) -> Vec<Question> {
        self.0.asked.lock().unwrap().clone()
    }
}

#[tonic::async_trait]
impl RbacChecker for Rbac {
    async fn allowed(
        &self,
        who: &Identity,
        verb: &str,
        namespace: &str,
        name: &str,
    ) -> Result<bool, BackendError> {
        let asked = question(&who.username, verb, namespace, name);
        self.0.asked.lock().unwrap().push(asked.clone());
        if self.0.failing.load(Ordering::SeqCst) {
            return Err(BackendError::new(std::io::Error::other("etcdserver: request timed out")));
        }
        Ok(self.0.allowed.lock().unwrap().contains(&asked))
    }
}

/// Records each retirement as (grantId, by) and each grant created (ids `created-N`, a
/// generated name `grant-N`); fails while told to, or answers a create as told.
#[derive(Clone, Default)]
struct Retirer(Arc<RetirerState>);

#[derive(Default)]
struct RetirerState {
    retired: Mutex<Vec<(String, String)>>,
    created: Mutex<Vec<Grant>>,
    failing: AtomicBool,
    /// What the next create answers instead of creating.
    refuse_create: Mutex<Option<CreateGrantError>>,
}

impl Retirer {
    fn retired(&self) -> Vec<(String, String)> {
        self.0.retired.lock().unwrap().clone()
    }

    fn created(&self) -> Vec<Grant> {
        self.0.created.lock().unwrap().clone()
    }

    fn fail(&self, failing: bool) {
        self.0.failing.store(failing, Ordering::SeqCst);
    }

    fn refuse_next_create(&self, error: CreateGrantError) {
        *self.0.refuse_create.lock().unwrap() = Some(error);
    }
}

#[tonic::async_trait]
impl GrantWriter for Retirer {
    async fn retire(&self, grant: &Grant, by: &str) -> Result<(), BackendError> {
        if self.0.failing.load(Ordering::SeqCst) {
            return Err(BackendError::new(std::io::Error::other("the object has been modified")));
        }
        self.0.retired.lock().unwrap().push((grant.grant_id.clone(), by.to_owned()));
        Ok(())
    }

    async fn create(&self, grant: &Grant) -> Result<(String, String), CreateGrantError> {
        if let Some(error) = self.0.refuse_create.lock().unwrap().take() {
            return Err(error);
        }
        let mut created = self.0.created.lock().unwrap();
        created.push(grant.clone());
        let n = created.len();
        let name = if grant.name.is_empty() { format!("grant-{n}") } else { grant.name.clone() };
        Ok((format!("created-{n}"), name))
    }
}

fn sa(namespace: &str, name: &str) -> Principal {
    Principal::ServiceAccount { namespace: namespace.into(), name: name.into() }
}

fn statement(effect: Effect, sid: &str, principal: Principal, operations: &[Op]) -> Statement {
    Statement { sid: Some(sid.into()), effect, principals: vec![principal], operations: operations.to_vec() }
}

fn allow(sid: &str, principal: Principal, operations: &[Op]) -> Statement {
    statement(Effect::Allow, sid, principal, operations)
}

fn deny(sid: &str, principal: Principal, operations: &[Op]) -> Statement {
    statement(Effect::Deny, sid, principal, operations)
}

/// A policy that delegates to RBAC what its statements do not decide.
fn delegating(statements: Vec<Statement>) -> Policy {
    Policy { delegate_to_rbac: true, statements }
}

/// A policy whose statements alone decide (delegateToRBAC: false).
fn policy_only(statements: Vec<Statement>) -> Policy {
    Policy { delegate_to_rbac: false, statements }
}

/// A policy that lets apps/web do everything and nobody else anything.
fn web_only() -> Policy {
    policy_only(vec![allow("web", sa("apps", "web"), &Op::ALL)])
}

/// An Enabled key at version 1.
fn key(namespace: &str, name: &str, key_id: &str, policy: Policy) -> Key {
    crate::testing::enabled_key(namespace, name, key_id, policy)
}

/// An Active grant on apps/k, resolved to its current keyId.
fn grant(name: &str, grant_id: &str, grantee: Principal, operations: &[Op]) -> Grant {
    Grant {
        namespace: "apps".into(),
        name: name.into(),
        grant_id: grant_id.into(),
        key_name: "k".into(),
        key_id: Some(K.into()),
        state: Some(GrantState::Active),
        retired_by: None,
        deleting: false,
        expires_at: None,
        grantee,
        operations: operations.to_vec(),
        constraints: None,
        retiring_principal: None,
        creator: None,
    }
}

fn ctx(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// `pairs` as [`ctx`] takes them.
fn borrowed(pairs: &[(String, String)]) -> Vec<(&str, &str)> {
    pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// A request as a workload sends it: with its bearer token.
fn authed<T>(token: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// Asserts that a call failed with exactly `code` and `message`.
#[track_caller]
fn refused<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, message: &str) {
    match result {
        Ok(v) => panic!("expected {code:?} {message:?}, got {v:?}"),
        Err(s) => assert_eq!((s.code(), s.message()), (code, message), "{s:?}"),
    }
}

/// What policy-only keys answer a caller no statement allows.
fn not_allowed_by_policy(who: &str, op: &str, key: &str) -> String {
    format!("{who} may not {op} with key {key}: no key policy statement, grant allows it")
}

/// What a caller refused by the Deny statement `sid` of `denied` is told.
fn denied_by_policy(namespace: &str, name: &str, op: &str, key: &str, sid: &str, denied: &str) -> String {
    let who = user(namespace, name);
    if op == denied {
        format!("{who} is denied {op} on key {key} by the key policy (statement {sid:?})")
    } else {
        format!(
            "{who} is denied {op} on key {key} by the key policy (statement {sid:?} denies {denied}, which {op} implies)"
        )
    }
}

/// What a caller refused the key (or grant) `name` for `op` is told, whether it exists or not.
fn refusal(name: &str, op: &str) -> String {
    match op {
        "RetireGrant" => format!("grant {name:?} does not exist or you may not retire it"),
        op => format!("key {name:?} does not exist or you may not use it for {op}"),
    }
}

/// Asserts that a call was refused the key (or grant) `name` for `op` with the answer that
/// tells nothing — the same for a key that does not exist — and that its audit line (the
/// last one) says why: `cause`.
#[track_caller]
fn forbidden<T: std::fmt::Debug>(h: &Harness, result: Result<T, Status>, name: &str, op: &str, cause: &str) {
    refused(result, Code::PermissionDenied, &refusal(name, op));
    let line = h.audit.lines().pop().unwrap();
    assert_eq!(
        (line["result"].as_str(), line["reason"].as_str()),
        (Some("PermissionDenied"), Some(cause)),
        "{line}"
    );
}

/// What delegating keys answer a caller nothing allows.
fn not_allowed(who: &str, op: &str, key: &str) -> String {
    format!("{who} may not {op} with key {key}: no key policy statement, grant or RBAC rule allows it")
}

fn re_encrypt_request(
    blob: &[u8],
    source_context: &[(&str, &str)],
    source_key: &str,
    destination_key: &str,
    destination_context: &[(&str, &str)],
) -> ReEncryptRequest {
    ReEncryptRequest {
        ciphertext_blob: blob.to_vec(),
        source_encryption_context: ctx(source_context),
        source_key: source_key.into(),
        destination_key: destination_key.into(),
        destination_encryption_context: ctx(destination_context),
    }
}

/// How a [`Harness`] sets up the server; by default as production does, but that RBAC
/// answers are not cached (so that the tests see every question).
struct Setup {
    auth: Settings,
    rbac_cache: CacheSettings,
    audit: AuditLimits,
    max_grants_per_key: std::num::NonZeroUsize,
    calls: super::CallLimits,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            auth: Settings::default(),
            rbac_cache: CacheSettings { ttl: Duration::ZERO, ..CacheSettings::default() },
            audit: AuditLimits::default(),
            max_grants_per_key: super::service::DEFAULT_MAX_GRANTS_PER_KEY,
            calls: super::CallLimits::default(),
        }
    }
}

struct Harness {
    /// Where the server listens.
    addr: std::net::SocketAddr,
    /// How many TokenReviews the server asked for.
    reviews: Arc<AtomicUsize>,
    directory: Arc<Directory>,
    root: Arc<RootKey>,
    rbac: Rbac,
    retirer: Retirer,
    audit: AuditSink,
    uses: CapturedUses,
    registry: Registry,
    client: KeyServiceClient<Channel>,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

impl Harness {
    async fn start() -> Harness {
        Harness::start_with(Setup::default()).await
    }

    async fn start_with(setup: Setup) -> Harness {
        let root = Arc::new(RootKey::from_material(KeyMaterial::generate().unwrap()));
        let directory = Arc::new(Directory::new(root.clone()));
        let (rbac, retirer, audit) = (Rbac::default(), Retirer::default(), AuditSink::default());
        let reviews = Arc::new(AtomicUsize::new(0));
        let mut registry = Registry::default();
        let uses = CapturedUses::default();
        let api = KeyApi::new(
            Authenticator::new(Reviewer::new(reviews.clone()), setup.auth),
            CachedRbac::new(rbac.clone(), &setup.rbac_cache),
            directory.clone(),
            retirer.clone(),
            audit.log_with(&root, setup.audit),
            OperationMetrics::register(&mut registry),
            Arc::new(uses.clone()),
        )
        .with_max_grants_per_key(setup.max_grants_per_key);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let shutdown = stop.clone().cancelled_owned();
        let server = tokio::spawn(async move {
            super::serve(
                api,
                None,
                listener,
                super::connections::Slots::new(super::connections::DEFAULT_MAX),
                setup.calls,
                shutdown,
            )
            .await
            .unwrap()
        });
        let client = KeyServiceClient::connect(format!("http://{addr}")).await.unwrap();
        Harness { addr, reviews, directory, root, rbac, retirer, audit, uses, registry, client, stop, server }
    }

    /// Adds a key holding `versions` versions of fresh material, wrapped by `root` as the
    /// controller stores it.
    fn add_key_wrapped_by(&self, root: &RootKey, key: Key, versions: u32) {
        let key_id = key.info.key_id.clone();
        let wrapped = (1..=versions)
            .map(|version| {
                let material = KeyMaterial::generate().unwrap();
                let bytes = root.wrap(&material, WrapContext { key_id: &key_id, version }).unwrap();
                (version, B64.encode(bytes))
            })
            .collect();
        self.directory.materials.apply(WrappedMaterial {
            key_id: key_id.clone(),
            uid: key.info.uid.clone(),
            root_key_fingerprint: root.fingerprint().into(),
            destroyed: false,
            deletion_time: None,
            versions: wrapped,
            revision: Some(uuid::Uuid::new_v4().to_string()),
            ..Default::default()
        });
        self.directory.keys.apply(key);
    }

    fn add_key(&self, key: Key, versions: u32) {
        self.add_key_wrapped_by(&self.root, key, versions);
    }

    /// A client whose connection comes from `source` (another loopback address), as another
    /// pod would.
    async fn client_from(&self, source: &str) -> KeyServiceClient<Channel> {
        let (addr, source): (_, std::net::IpAddr) = (self.addr, source.parse().unwrap());
        let connect = tower::service_fn(move |_: http::Uri| async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(std::net::SocketAddr::new(source, 0))?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(socket.connect(addr).await?))
        });
        let endpoint = tonic::transport::Endpoint::from_static("http://kubekms.test");
        KeyServiceClient::new(endpoint.connect_with_connector(connect).await.unwrap())
    }

    /// Changes a key as its watch would report the change.
    fn change_key(&self, namespace: &str, name: &str, change: impl FnOnce(&mut Key)) {
        let mut key = (*self.directory.keys.get(namespace, name).unwrap()).clone();
        change(&mut key);
        self.directory.keys.apply(key);
    }

    /// The metrics as `/metrics` serves them.
    fn metrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }

    async fn encrypt(
        &self,
        token: &str,
        key: &str,
        plaintext: &[u8],
        context: &[(&str, &str)],
    ) -> Result<EncryptResponse, Status> {
        let request = EncryptRequest {
            key: key.into(),
            plaintext: plaintext.to_vec(),
            encryption_context: ctx(context),
        };
        self.client.clone().encrypt(authed(token, request)).await.map(tonic::Response::into_inner)
    }

    async fn decrypt(
        &self,
        token: &str,
        blob: &[u8],
        context: &[(&str, &str)],
        key: &str,
    ) -> Result<DecryptResponse, Status> {
        let request = DecryptRequest {
            ciphertext_blob: blob.to_vec(),
            encryption_context: ctx(context),
            key: key.into(),
        };
        self.client.clone().decrypt(authed(token, request)).await.map(tonic::Response::into_inner)
    }

    async fn re_encrypt(&self, token: &str, request: ReEncryptRequest) -> Result<ReEncryptResponse, Status> {
        self.client.clone().re_encrypt(authed(token, request)).await.map(tonic::Response::into_inner)
    }

    async fn data_key(
        &self,
        token: &str,
        key: &str,
        context: &[(&str, &str)],
        number_of_bytes: u32,
    ) -> Result<GenerateDataKeyResponse, Status> {
        let request =
            GenerateDataKeyRequest { key: key.into(), encryption_context: ctx(context), number_of_bytes };
        self.client.clone().generate_data_key(authed(token, request)).await.map(tonic::Response::into_inner)
    }

    async fn data_key_only(
        &self,
        token: &str,
        key: &str,
        context: &[(&str, &str)],
        number_of_bytes: u32,
    ) -> Result<GenerateDataKeyWithoutPlaintextResponse, Status> {
        let request = GenerateDataKeyWithoutPlaintextRequest {
            key: key.into(),
            encryption_context: ctx(context),
            number_of_bytes,
        };
        self.client
            .clone()
            .generate_data_key_without_plaintext(authed(token, request))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn random(&self, token: &str, number_of_bytes: u32) -> Result<GenerateRandomResponse, Status> {
        let request = GenerateRandomRequest { number_of_bytes };
        self.client.clone().generate_random(authed(token, request)).await.map(tonic::Response::into_inner)
    }

    async fn describe(&self, token: &str, key: &str) -> Result<KeyMetadata, Status> {
        let request = DescribeKeyRequest { key: key.into() };
        let response = self.client.clone().describe_key(authed(token, request)).await?;
        Ok(response.into_inner().metadata.unwrap())
    }

    async fn retire(&self, token: &str, grant: &str) -> Result<String, Status> {
        let request = RetireGrantRequest { grant: grant.into() };
        Ok(self.client.clone().retire_grant(authed(token, request)).await?.into_inner().grant_id)
    }

    /// CreateGrant of `operations` on `key` to partner/reader, named `name` (empty: a
    /// generated name); returns (grantId, grant).
    async fn create_grant(
        &self,
        token: &str,
        key: &str,
        name: &str,
        operations: &[&str],
    ) -> Result<(String, String), Status> {
        let request = CreateGrantRequest {
            key: key.into(),
            name: name.into(),
            grantee: Some(crate::proto::keyapi::Principal {
                kind: "ServiceAccount".into(),
                name: "reader".into(),
                namespace: "partner".into(),
            }),
            operations: operations.iter().map(|o| (*o).to_owned()).collect(),
            ..Default::default()
        };
        let created = self.client.clone().create_grant(authed(token, request)).await?.into_inner();
        Ok((created.grant_id, created.grant))
    }

    async fn stop(self) {
        drop(self.client);
        self.stop.cancel();
        self.server.await.unwrap();
    }
}

#[tokio::test]
async fn callers_without_a_valid_token_are_unauthenticated() {
    let h = Harness::start().await;
    h.add_key(key("apps", "k", K, web_only()), 1);
    let request = || EncryptRequest {
        key: "apps/k".into(),
        plaintext: b"x".to_vec(),
        encryption_context: HashMap::new(),
    };
    let mut c = h.client.clone();
    refused(
        c.encrypt(Request::new(request())).await,
        Code::Unauthenticated,
        "missing bearer token: send `authorization: Bearer <ServiceAccount token>`",
    );
    for header in ["Basic d2ViOnNlY3JldA==", "Bearer", "token-without-a-scheme"] {
        let mut r = Request::new(request());
        r.metadata_mut().insert("authorization", header.parse().unwrap());
        refused(
            c.encrypt(r).await,
            Code::Unauthenticated,
            "the authorization header is not `Bearer <token>`",
        );
    }
    let expired_jwt =
        format!("x.{}.sig", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"exp":1}"#));
    for rejected in ["not-a-token", token("elsewhere", "ghost").as_str(), expired_jwt.as_str()] {
        refused(
            h.encrypt(rejected, "apps/k", b"x", &[]).await,
            Code::Unauthenticated,
            r#"invalid or expired token, or a token not meant for audience "kubekms""#,
        );
    }
    // The API server cannot be asked: unavailable, and not a word of the cause.
    refused(
        h.encrypt(BROKEN, "apps/k", b"x", &[]).await,
        Code::Unavailable,
        "cannot authenticate callers right now",
    );
    // The scheme is case-insensitive.
    let mut r = Request::new(request());
    r.metadata_mut().insert("authorization", format!("bearer {}", token("apps", "web")).parse().unwrap());
    c.encrypt(r).await.unwrap();

    assert!(h.rbac.asked().is_empty());
    let lines = h.audit.lines();
    assert_eq!(lines.len(), 9, "one line per call");
    for line in &lines[..8] {
        assert_eq!(line["principal"], "", "{line}");
        assert!(line.get("key").is_none(), "an unauthenticated caller resolves no key: {line}");
    }
    assert_eq!(lines[0]["result"], "Unauthenticated");
    assert_eq!(lines[7]["result"], "Unavailable");
    assert_eq!(lines[7]["reason"], "cannot authenticate callers right now");
    assert_eq!(
        (lines[8]["principal"].as_str(), lines[8]["result"].as_str()),
        (Some(user("apps", "web").as_str()), Some("OK"))
    );
    h.stop().await;
}

#[tokio::test]
async fn an_explicit_deny_wins_over_an_allow_statement_a_grant_and_rbac() {
    let h = Harness::start().await;
    let everyone_in_apps = Principal::Group("system:serviceaccounts:apps".into());
    let policy = delegating(vec![
        allow("apps-use", everyone_in_apps, &[Op::Encrypt, Op::Decrypt]),
        deny("no-intruder", sa("apps", "intruder"), &[Op::Decrypt]),
    ]);
    h.add_key(key("apps", "k", K, policy), 1);
    h.directory.grants.apply(grant("for-intruder", "grant-1", sa("apps", "intruder"), &[Op::Decrypt]));
    h.rbac.allow(&user("apps", "intruder"), "decrypt", "apps", "k");
    let intruder = token("apps", "intruder");

    // The Allow statement lets the intruder encrypt; the Deny is for Decrypt only.
    let blob = h.encrypt(&intruder, "apps/k", b"secret", &[]).await.unwrap().ciphertext_blob;
    forbidden(
        &h,
        h.decrypt(&intruder, &blob, &[], "").await,
        K,
        "Decrypt",
        r#"system:serviceaccount:apps:intruder is denied Decrypt on key apps/k by the key policy (statement "no-intruder")"#,
    );
    assert_eq!(h.decrypt(&token("apps", "web"), &blob, &[], "").await.unwrap().plaintext, b"secret");
    assert!(h.rbac.asked().is_empty(), "RBAC is not asked once a statement decided");

    let refusal = &h.audit.lines()[1];
    assert_eq!(refusal["principal"], user("apps", "intruder"));
    assert_eq!((refusal["key"].as_str(), refusal["keyVersion"].as_u64()), (Some("apps/k"), Some(1)));
    assert_eq!(refusal["result"], "PermissionDenied");
    assert!(refusal.get("grantId").is_none(), "the grant allowed nothing: {refusal}");
    h.stop().await;
}

#[tokio::test]
async fn a_policy_only_key_is_used_by_its_allow_statements_alone() {
    let h = Harness::start().await;
    let policy =
        policy_only(vec![allow("web", sa("apps", "web"), &[Op::Encrypt, Op::Decrypt, Op::DescribeKey])]);
    h.add_key(key("apps", "a", K, policy), 1);
    let other = user("apps", "other");
    for verb in ["encrypt", "decrypt"] {
        h.rbac.allow(&other, verb, "apps", "a");
    }
    let web = token("apps", "web");

    let e = h.encrypt(&web, "apps/a", b"for web", &[]).await.unwrap();
    assert_eq!(e.key.unwrap().version, 1);
    assert_eq!(h.decrypt(&web, &e.ciphertext_blob, &[], "").await.unwrap().plaintext, b"for web");
    // RBAC would allow "other", but the key does not delegate to it.
    forbidden(
        &h,
        h.encrypt(&token("apps", "other"), "apps/a", b"x", &[]).await,
        "apps/a",
        "Encrypt",
        "system:serviceaccount:apps:other may not Encrypt with key apps/a: no key policy statement, grant allows it",
    );
    forbidden(
        &h,
        h.decrypt(&token("apps", "other"), &e.ciphertext_blob, &[], "").await,
        K,
        "Decrypt",
        &not_allowed_by_policy(&other, "Decrypt", "apps/a"),
    );
    // A statement allows only the operations it names.
    forbidden(
        &h,
        h.data_key(&web, "apps/a", &[], 0).await,
        "apps/a",
        "GenerateDataKey",
        &not_allowed_by_policy(&user("apps", "web"), "GenerateDataKey", "apps/a"),
    );
    assert!(h.rbac.asked().is_empty(), "a policy that does not delegate never asks RBAC");
    h.stop().await;
}

#[tokio::test]
async fn rbac_is_asked_only_when_the_policy_delegates_and_nothing_else_allowed() {
    let h = Harness::start().await;
    h.add_key(key("apps", "k", K, delegating(vec![allow("web", sa("apps", "web"), &[Op::Encrypt])])), 1);
    let (writer, web) = (token("apps", "writer"), token("apps", "web"));
    let writer_name = user("apps", "writer");
    h.rbac.allow(&writer_name, "encrypt", "apps", "k");

    let blob = h.encrypt(&writer, "apps/k", b"data", &[]).await.unwrap().ciphertext_blob;
    assert_eq!(h.rbac.asked(), vec![question(&writer_name, "encrypt", "apps", "k")]);
    // Named by keyId, the key is still asked about by namespace and name.
    h.encrypt(&writer, K, b"by id", &[]).await.unwrap();
    assert_eq!(h.rbac.asked()[1], question(&writer_name, "encrypt", "apps", "k"));
    // A statement answers first.
    h.encrypt(&web, "apps/k", b"x", &[]).await.unwrap();
    assert_eq!(h.rbac.asked().len(), 2);

    // Each operation is its own verb.
    forbidden(
        &h,
        h.decrypt(&writer, &blob, &[], "").await,
        K,
        "Decrypt",
        &not_allowed(&writer_name, "Decrypt", "apps/k"),
    );
    forbidden(
        &h,
        h.data_key(&writer, "apps/k", &[], 0).await,
        "apps/k",
        "GenerateDataKey",
        &not_allowed(&writer_name, "GenerateDataKey", "apps/k"),
    );
    forbidden(
        &h,
        h.data_key_only(&writer, "apps/k", &[], 0).await,
        "apps/k",
        "GenerateDataKeyWithoutPlaintext",
        &not_allowed(&writer_name, "GenerateDataKeyWithoutPlaintext", "apps/k"),
    );
    forbidden(
        &h,
        h.re_encrypt(&writer, re_encrypt_request(&blob, &[], "", "apps/k", &[])).await,
        K,
        "ReEncryptFrom",
        &not_allowed(&writer_name, "ReEncryptFrom", "apps/k"),
    );
    forbidden(
        &h,
        h.describe(&writer, "apps/k").await,
        "apps/k",
        "DescribeKey",
        &not_allowed(&writer_name, "DescribeKey", "apps/k"),
    );
    let verbs: Vec<String> = h.rbac.asked()[2..].iter().map(|q| q.1.clone()).collect();
    assert_eq!(
        verbs,
        ["decrypt", "generatedatakey", "generatedatakeywithoutplaintext", "reencryptfrom", "describekey"]
    );
    forbidden(
        &h,
        h.encrypt(&token("apps", "other"), "apps/k", b"x", &[]).await,
        "apps/k",
        "Encrypt",
        "system:serviceaccount:apps:other may not Encrypt with key apps/k: no key policy statement, grant or RBAC rule allows it",
    );

    // RBAC cannot be asked: unavailable, unless a statement answers without it.
    h.rbac.fail(true);
    refused(
        h.encrypt(&writer, "apps/k", b"x", &[]).await,
        Code::Unavailable,
        "cannot check Kubernetes RBAC right now",
    );
    h.encrypt(&web, "apps/k", b"x", &[]).await.unwrap();
    h.stop().await;
}

#[tokio::test]
async fn an_active_grant_allows_its_grantee_its_operations_and_nothing_more() {
    let h = Harness::start().await;
    h.add_key(key("apps", "k", K, delegating(vec![allow("owner", sa("apps", "owner"), &[Op::Encrypt])])), 1);
    // The grantee is a ServiceAccount of another namespace (another account).
    h.directory.grants.apply(grant(
        "reader",
        "grant-1",
        sa("partner", "reader"),
        &[Op::Decrypt, Op::GenerateDataKey],
    ));
    let blob = h.encrypt(&token("apps", "owner"), "apps/k", b"shared", &[]).await.unwrap().ciphertext_blob;
    let reader = token("partner", "reader");

    assert_eq!(h.decrypt(&reader, &blob, &[], "").await.unwrap().plaintext, b"shared");
    let line = h.audit.lines().pop().unwrap();
    assert_eq!(
        (line["principal"].as_str(), line["grantId"].as_str()),
        (Some(user("partner", "reader").as_str()), Some("grant-1"))
    );
    assert_eq!(h.data_key(&reader, "apps/k", &[], 0).await.unwrap().plaintext.len(), 32);
    assert_eq!(h.audit.lines().pop().unwrap()["grantId"], "grant-1");
    assert!(h.rbac.asked().is_empty(), "a grant answers without RBAC");

    forbidden(
        &h,
        h.encrypt(&reader, "apps/k", b"x", &[]).await,
        "apps/k",
        "Encrypt",
        &not_allowed(&user("partner", "reader"), "Encrypt", "apps/k"),
    );
    forbidden(
        &h,
        h.decrypt(&token("partner", "stranger"), &blob, &[], "").await,
        K,
        "Decrypt",
        &not_allowed(&user("partner", "stranger"), "Decrypt", "apps/k"),
    );
    // The same name in the key's own namespace is another ServiceAccount.
    forbidden(
        &h,
        h.decrypt(&token("apps", "reader"), &blob, &[], "").await,
        K,
        "Decrypt",
        &not_allowed(&user("apps", "reader"), "Decrypt", "apps/k"),
    );
    assert_eq!(
        h.rbac.asked(),
        vec![
            question(&user("partner", "reader"), "encrypt", "apps", "k"),
            question(&user("partner", "stranger"), "decrypt", "apps", "k"),
            question(&user("apps", "reader"), "decrypt", "apps", "k"),
        ]
    );
    h.stop().await;
}

#[tokio::test]
async fn grant_constraints_are_checked_against_the_encryption_context() {
    let h = Harness::start().await;
    h.add_key(key("apps", "k", K, delegating(vec![allow("owner", sa("apps", "owner"), &[Op::Encrypt])])), 1);
    let subset = [("tenant".to_owned(), "acme".to_owned())].into();
    let equals = [("tenant".to_owned(), "evil".to_owned())].into();
    h.directory.grants.apply(Grant {
        constraints: Some(Constraints::Subset(subset)),
        ..grant("subset", "grant-subset", sa("partner", "reader"), &[Op::Decrypt])
    });
    h.directory.grants.apply(Grant {
        constraints: Some(Constraints::Equals(equals)),
        ..grant("equals", "grant-equals", sa("partner", "stranger"), &[Op::Decrypt])
    });
    let owner = token("apps", "owner");
    let acme_context = [("tenant", "acme"), ("doc", "1")];
    let more_context = [("tenant", "evil"), ("doc", "1")];
    let acme = h.encrypt(&owner, "apps/k", b"acme data", &acme_context).await.unwrap().ciphertext_blob;
    let evil =
        h.encrypt(&owner, "apps/k", b"evil data", &[("tenant", "evil")]).await.unwrap().ciphertext_blob;
    let more = h.encrypt(&owner, "apps/k", b"more data", &more_context).await.unwrap().ciphertext_blob;
    let (reader, stranger) = (token("partner", "reader"), token("partner", "stranger"));
    let denied = |who: &str| not_allowed(&user("partner", who), "Decrypt", "apps/k");

    // encryptionContextSubset: the pairs must be there; more may be.
    assert_eq!(h.decrypt(&reader, &acme, &acme_context, "").await.unwrap().plaintext, b"acme data");
    assert_eq!(h.audit.lines().pop().unwrap()["grantId"], "grant-subset");
    forbidden(
        &h,
        h.decrypt(&reader, &evil, &[("tenant", "evil")], "").await,
        K,
        "Decrypt",
        &denied("reader"),
    );
    // Authorization comes before decryption: a missing context is refused by the grant.
    forbidden(&h, h.decrypt(&reader, &acme, &[], "").await, K, "Decrypt", &denied("reader"));

    // encryptionContextEquals: exactly these pairs.
    assert_eq!(h.decrypt(&stranger, &evil, &[("tenant", "evil")], "").await.unwrap().plaintext, b"evil data");
    assert_eq!(h.audit.lines().pop().unwrap()["grantId"], "grant-equals");
    forbidden(&h, h.decrypt(&stranger, &more, &more_context, "").await, K, "Decrypt", &denied("stranger"));
    forbidden(&h, h.decrypt(&stranger, &acme, &acme_context, "").await, K, "Decrypt", &denied("stranger"));
    h.stop().await;
}

#[tokio::test]
async fn grants_not_active_for_this_very_key_give_nothing() {
    let h = Harness::start().await;
    h.add_key(key("apps", "k", K, delegating(vec![allow("owner", sa("apps", "owner"), &[Op::Encrypt])])), 1);
    let blob = h.encrypt(&token("apps", "owner"), "apps/k", b"guarded", &[]).await.unwrap().ciphertext_blob;
    let reader = token("partner", "reader");
    let live = grant("g", "grant-1", sa("partner", "reader"), &[Op::Decrypt]);
    let past: Timestamp = "2020-01-01T00:00:00Z".parse().unwrap();
    let future: Timestamp = "2100-01-01T00:00:00Z".parse().unwrap();

    let dead = [
        ("Expired", Grant { state: Some(GrantState::Expired), ..live.clone() }),
        ("Retired", Grant { state: Some(GrantState::Retired), ..live.clone() }),
        ("Invalid", Grant { state: Some(GrantState::Invalid), ..live.clone() }),
        ("not reconciled yet", Grant { state: None, key_id: None, ..live.clone() }),
        ("past expiresAt, still marked Active", Grant { expires_at: Some(past), ..live.clone() }),
        (
            "retired through the key API, not yet marked",
            Grant { retired_by: Some(user("partner", "reader")), ..live.clone() },
        ),
        ("being deleted", Grant { deleting: true, ..live.clone() }),
        ("made for an earlier key of the same name", Grant { key_id: Some(EARLIER.into()), ..live.clone() }),
        ("Active without a keyId", Grant { key_id: None, ..live.clone() }),
        // Grants are the key's namespace's: one elsewhere names another key k, whatever
        // keyId its status claims.
        ("in another namespace", Grant { namespace: "partner".into(), ..live.clone() }),
    ];
    for (why, grant) in dead {
        h.directory.grants.replace_all(vec![grant]);
        let err = h.decrypt(&reader, &blob, &[], "").await.unwrap_err();
        assert_eq!(
            (err.code(), err.message()),
            (Code::PermissionDenied, refusal(K, "Decrypt").as_str()),
            "{why}"
        );
        let reason = h.audit.lines().pop().unwrap()["reason"].clone();
        assert_eq!(reason, not_allowed(&user("partner", "reader"), "Decrypt", "apps/k"), "{why}");
    }
    // The same grant, Active and not yet expired, allows: each refusal above was its state's.
    h.directory.grants.replace_all(vec![Grant { expires_at: Some(future), ..live }]);
    assert_eq!(h.decrypt(&reader, &blob, &[], "").await.unwrap().plaintext, b"guarded");
    h.stop().await;
}

#[tokio::test]
async fn grants_are_retired_by_their_grantee_or_retiring_principal_only() {
    let h = Harness::start().await;
    h.add_key(key("apps", "k", K, delegating(Vec::new())), 1);
    let retirable = |name: &str, id: &str| Grant {
        retiring_principal: Some(sa("apps", "owner")),
        ..grant(name, id, sa("partner", "reader"), &[Op::Decrypt])
    };
    h.directory.grants.apply(retirable("a", "grant-a"));
    h.directory.grants.apply(retirable("b", "grant-b"));
    h.directory
        .grants
        .apply(Grant { retired_by: Some(user("apps", "owner")), ..retirable("done", "grant-done") });
    let (reader, owner) = (token("partner", "reader"), token("apps", "owner"));

    forbidden(
        &h,
        h.retire(&token("partner", "stranger"), "apps/a").await,
        "apps/a",
        "RetireGrant",
        &not_allowed(&user("partner", "stranger"), "RetireGrant", "apps/k"),
    );
    assert!(h.retirer.retired().is_empty());
    // The grantee, by grantId; the retiring principal, by namespace/name.
    assert_eq!(h.retire(&reader, "grant-a").await.unwrap(), "grant-a");
    assert_eq!(h.retirer.retired(), vec![("grant-a".to_owned(), user("partner", "reader"))]);
    assert_eq!(h.retire(&owner, "apps/b").await.unwrap(), "grant-b");
    assert_eq!(h.retirer.retired()[1..], [("grant-b".to_owned(), user("apps", "owner"))]);
    // Retiring a retired grant succeeds without another write.
    assert_eq!(h.retire(&reader, "apps/done").await.unwrap(), "grant-done");
    assert_eq!(h.retirer.retired().len(), 2);

    forbidden(
        &h,
        h.retire(&reader, "apps/nope").await,
        "apps/nope",
        "RetireGrant",
        r#"grant "apps/nope" not found"#,
    );
    refused(
        h.retire(&reader, "").await,
        Code::InvalidArgument,
        "grant is required (namespace/name or grantId)",
    );
    h.retirer.fail(true);
    refused(h.retire(&reader, "apps/a").await, Code::Unavailable, "failed to update the grant");

    let lines = h.audit.lines();
    let retired =
        |i: usize| (lines[i]["grantId"].as_str(), lines[i]["key"].as_str(), lines[i]["result"].as_str());
    assert_eq!(retired(0), (Some("grant-a"), Some("apps/k"), Some("PermissionDenied")));
    assert_eq!(retired(1), (Some("grant-a"), Some("apps/k"), Some("OK")));
    assert_eq!(retired(2), (Some("grant-b"), Some("apps/k"), Some("OK")));
    assert_eq!(lines[2]["principal"], user("apps", "owner"));
    // The grant's own rule answers first; RBAC only for the stranger, whom it did not allow.
    assert_eq!(h.rbac.asked(), vec![question(&user("partner", "stranger"), "retiregrant", "apps", "k")]);
    h.stop().await;
}

#[tokio::test]
async fn a_group_grantee_retires_only_with_retire_grant_and_policy_and_rbac_decide_as_for_any_operation() {
    let h = Harness::start().await;
    let apps = Principal::Group("system:serviceaccounts:apps".into());
    h.add_key(
        key(
            "apps",
            "k",
            K,
            delegating(vec![
                allow("admin", sa("apps", "owner"), &[Op::RetireGrant]),
                deny("no-retiring", sa("apps", "intruder"), &[Op::RetireGrant]),
            ]),
        ),
        1,
    );
    h.directory.grants.apply(grant("group", "grant-group", apps.clone(), &[Op::Decrypt]));
    h.directory.grants.apply(grant("retirable", "grant-retirable", apps, &[Op::Decrypt, Op::RetireGrant]));
    h.directory.grants.apply(grant("intruders", "grant-intruders", sa("apps", "intruder"), &[Op::Decrypt]));
    h.directory.grants.apply(grant("readers", "grant-readers", sa("partner", "reader"), &[Op::Decrypt]));
    let web = token("apps", "web");

    // One member of the group may not retire the grant for every member …
    forbidden(
        &h,
        h.retire(&web, "apps/group").await,
        "apps/group",
        "RetireGrant",
        &not_allowed(&user("apps", "web"), "RetireGrant", "apps/k"),
    );
    // … unless the grant lists RetireGrant.
    assert_eq!(h.retire(&web, "apps/retirable").await.unwrap(), "grant-retirable");
    // A key policy Allow lets a key administrator retire any grant of the key …
    assert_eq!(h.retire(&token("apps", "owner"), "apps/group").await.unwrap(), "grant-group");
    // … and a Deny refuses even a grantee its own grant.
    forbidden(
        &h,
        h.retire(&token("apps", "intruder"), "apps/intruders").await,
        "apps/intruders",
        "RetireGrant",
        &denied_by_policy("apps", "intruder", "RetireGrant", "apps/k", "no-retiring", "RetireGrant"),
    );
    // RBAC's verb retiregrant on the key, when the policy delegates.
    h.rbac.allow(&user("apps", "writer"), "retiregrant", "apps", "k");
    assert_eq!(h.retire(&token("apps", "writer"), "apps/readers").await.unwrap(), "grant-readers");
    assert_eq!(
        h.retirer.retired(),
        vec![
            ("grant-retirable".to_owned(), user("apps", "web")),
            ("grant-group".to_owned(), user("apps", "owner")),
            ("grant-readers".to_owned(), user("apps", "writer")),
        ]
    );
    h.stop().await;
}

#[tokio::test]
async fn a_connection_holds_its_most_calls_and_a_call_its_time() {
    // Long enough that both calls get in before the first ends, even on a loaded machine.
    let calls = super::CallLimits { timeout: Duration::from_secs(5), per_connection: 2 };
    let audit = AuditLimits { timeout: Duration::from_secs(3600), queue: 64 };
    let h = Harness::start_with(Setup { calls, audit, ..Setup::default() }).await;
    h.add_key(key("apps", "k", K, delegating(vec![])), 1);
    let callers = ["writer", "reader", "other"];
    for name in callers {
        h.rbac.allow(&user("apps", name), "encrypt", "apps", "k");
    }
    // Each call waits for its audit line, which the stalled sink does not write.
    h.audit.stall(true);
    let calls: Vec<_> = callers
        .iter()
        .map(|name| {
            let (mut client, token) = (h.client.clone(), token("apps", name));
            let request =
                EncryptRequest { key: "apps/k".into(), plaintext: b"x".to_vec(), ..Default::default() };
            tokio::spawn(async move { client.encrypt(authed(&token, request)).await })
        })
        .collect();
    // Three callers on one connection: two get in (each authenticated: a TokenReview of
    // its own token), the third waits for one of them to end.
    let reviewed = || h.reviews.load(Ordering::SeqCst);
    let two_in = async {
        while reviewed() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), two_in).await.expect("two calls to get in");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(reviewed(), 2, "the third call waits outside");
    assert!(calls.iter().all(|c| !c.is_finished()));
    // The transport ends each at its time; then the third gets in, and ends the same way.
    for call in calls {
        let status = call.await.unwrap().unwrap_err();
        assert_eq!((status.code(), status.message()), (Code::Cancelled, "Timeout expired"), "{status:?}");
    }
    assert_eq!(reviewed(), 3);
    h.audit.stall(false);
    h.encrypt(&token("apps", "writer"), "apps/k", b"x", &[]).await.unwrap();
    h.stop().await;
}

#[tokio::test]
async fn creategrant_stops_at_the_most_grants_a_key_may_have_and_tells_only_grantors() {
    let max = std::num::NonZeroUsize::new(3).unwrap();
    let h = Harness::start_with(Setup { max_grants_per_key: max, ..Setup::default() }).await;
    h.add_key(key("apps", "k", K, delegating(vec![])), 1);
    h.add_key(key("apps", "other", SPARE, delegating(vec![])), 1);
    for name in ["k", "other"] {
        h.rbac.allow(&user("apps", "writer"), "creategrant", "apps", name);
    }
    let (writer, intruder) = (token("apps", "writer"), token("apps", "intruder"));
    // Held: an active grant and a retired one (both count), one being deleted (does not).
    h.directory.grants.apply(grant("g1", "grant-1", sa("partner", "reader"), &[Op::Decrypt]));
    let retired = grant("g2", "grant-2", sa("partner", "reader"), &[Op::Decrypt]);
    h.directory.grants.apply(Grant { state: Some(GrantState::Retired), ..retired });
    let going = grant("g3", "grant-3", sa("partner", "reader"), &[Op::Decrypt]);
    h.directory.grants.apply(Grant { deleting: true, ..going });
    h.create_grant(&writer, "apps/k", "", &["Decrypt"]).await.unwrap();
    // The watch brings the new grant in: the key now has its three.
    h.directory.grants.apply(grant("g4", "grant-4", sa("partner", "reader"), &[Op::Decrypt]));
    let full = "key apps/k has 3 grants, and a key may have at most 3 (--max-grants-per-key): retire or delete some first (retired and expired grants count until deleted)";
    refused(h.create_grant(&writer, "apps/k", "", &["Decrypt"]).await, Code::ResourceExhausted, full);
    let line = h.audit.lines().pop().unwrap();
    assert_eq!((line["result"].as_str(), line["reason"].as_str()), (Some("ResourceExhausted"), Some(full)));
    let metrics = h.metrics();
    let counted = r#"kubekms_operations_total{component="server",key="apps/k",operation="CreateGrant",result="ResourceExhausted"} 1"#;
    assert!(metrics.lines().any(|l| l == counted), "missing {counted} in\n{metrics}");
    // A caller without the right to grant learns nothing about the key's grants.
    forbidden(
        &h,
        h.create_grant(&intruder, "apps/k", "", &["Decrypt"]).await,
        "apps/k",
        "CreateGrant",
        "system:serviceaccount:apps:intruder may not create this grant on key apps/k: system:serviceaccount:apps:intruder has no right to grant on the key: no key policy statement allows it CreateGrant, no grant gives it CreateGrant, and RBAC does not allow it the verb creategrant on the key",
    );
    // The bound is per key; deleting a grant makes room again.
    h.create_grant(&writer, "apps/other", "", &["Decrypt"]).await.unwrap();
    h.directory.grants.delete("apps", "g2");
    h.create_grant(&writer, "apps/k", "", &["Decrypt"]).await.unwrap();
    assert_eq!(h.retirer.created().len(), 3, "nothing was created past the bound");
    h.stop().await;
}

#[tokio::test]
async fn creategrant_takes_the_right_to_grant_and_records_the_caller() {
    let h = Harness::start().await;
    // apps/k delegates to RBAC but denies intruder CreateGrant; apps/p is policy-only and
    // lets owner grant.
    let no_grants = deny("no-grants", sa("apps", "intruder"), &[Op::CreateGrant]);
    h.add_key(key("apps", "k", K, delegating(vec![no_grants])), 1);
    h.add_key(
        key(
            "apps",
            "p",
            SPARE,
            policy_only(vec![allow("grantors", sa("apps", "owner"), &[Op::CreateGrant])]),
        ),
        1,
    );
    h.rbac.allow(&user("apps", "writer"), "creategrant", "apps", "k");
    h.rbac.allow(&user("apps", "intruder"), "creategrant", "apps", "k");
    let (writer, owner, intruder) =
        (token("apps", "writer"), token("apps", "owner"), token("apps", "intruder"));

    // By RBAC, and by the key policy: the caller is the creator, never the server.
    assert_eq!(
        h.create_grant(&writer, "apps/k", "", &["Decrypt"]).await.unwrap(),
        ("created-1".into(), "apps/grant-1".into())
    );
    assert_eq!(
        h.create_grant(&owner, "apps/p", "", &["Decrypt", "DescribeKey"]).await.unwrap().0,
        "created-2"
    );
    let created = h.retirer.created();
    let creator = created[0].creator.clone().unwrap();
    assert_eq!(creator.identity.username, user("apps", "writer"));
    assert_eq!(creator.identity.groups, ["system:serviceaccounts", "system:serviceaccounts:apps"]);
    assert_eq!(creator.parent_grant, None);
    assert_eq!((created[0].namespace.as_str(), created[0].key_name.as_str()), ("apps", "k"));
    assert_eq!(created[0].grantee, sa("partner", "reader"));
    assert_eq!(created[1].operations, [Op::Decrypt, Op::DescribeKey]);
    assert_eq!(created[1].creator.as_ref().unwrap().identity.username, user("apps", "owner"));
    let asked: Vec<Question> = h.rbac.asked();
    assert_eq!(
        asked,
        [question(&user("apps", "writer"), "creategrant", "apps", "k")],
        "the policy decided for p"
    );

    // A Deny of CreateGrant wins over RBAC; without any right, nothing.
    // The caller is told only that it may not; the audit line says why.
    forbidden(
        &h,
        h.create_grant(&intruder, "apps/k", "", &["Decrypt"]).await,
        "apps/k",
        "CreateGrant",
        r#"system:serviceaccount:apps:intruder may not create this grant on key apps/k: the key policy denies system:serviceaccount:apps:intruder CreateGrant (statement "no-grants")"#,
    );
    assert_eq!(h.rbac.asked().len(), 1, "RBAC is not asked once a Deny matched");
    forbidden(
        &h,
        h.create_grant(&writer, "apps/p", "", &["Decrypt"]).await,
        "apps/p",
        "CreateGrant",
        "system:serviceaccount:apps:writer may not create this grant on key apps/p: system:serviceaccount:apps:writer has no right to grant on the key: no key policy statement allows it CreateGrant, no grant gives it CreateGrant, and the key policy does not delegate to RBAC",
    );
    assert_eq!(h.retirer.created().len(), 2, "nothing else was created");

    // A grant that gives CreateGrant lets its grantee grant within it, and records it.
    let parent = grant("parent", "grant-parent", sa("apps", "reader"), &[Op::Decrypt, Op::CreateGrant]);
    h.directory.grants.apply(parent);
    let reader = token("apps", "reader");
    assert_eq!(h.create_grant(&reader, "apps/k", "", &["Decrypt"]).await.unwrap().0, "created-3");
    let creator = h.retirer.created()[2].creator.clone().unwrap();
    assert_eq!(creator.parent_grant.as_deref(), Some("grant-parent"));
    let wider = h.create_grant(&reader, "apps/k", "", &["Encrypt"]).await.unwrap_err();
    assert_eq!(wider.code(), Code::PermissionDenied);
    let reason = h.audit.lines().pop().unwrap()["reason"].as_str().unwrap().to_owned();
    assert!(
        reason.contains("grant grant-parent gives it CreateGrant, but this grant gives more"),
        "{reason}"
    );

    // Bad terms, unknown keys and the API server's refusals, each precisely.
    refused(
        h.create_grant(&writer, "apps/k", "", &["decrypt"]).await,
        Code::InvalidArgument,
        r#"operations: "decrypt" is not an operation (Encrypt, Decrypt, GenerateDataKey, GenerateDataKeyWithoutPlaintext, ReEncryptFrom, ReEncryptTo, DescribeKey, RetireGrant, CreateGrant)"#,
    );
    forbidden(
        &h,
        h.create_grant(&writer, "apps/nope", "", &["Decrypt"]).await,
        "apps/nope",
        "CreateGrant",
        r#"key "apps/nope" not found"#,
    );
    h.retirer.refuse_next_create(CreateGrantError::Exists);
    refused(
        h.create_grant(&writer, "apps/k", "taken", &["Decrypt"]).await,
        Code::AlreadyExists,
        "grant apps/taken already exists",
    );
    h.retirer.refuse_next_create(CreateGrantError::Exists);
    refused(
        h.create_grant(&writer, "apps/k", "", &["Decrypt"]).await,
        Code::Unavailable,
        "failed to create the grant",
    );
    h.retirer.refuse_next_create(CreateGrantError::Invalid("spec.expiresAt: Invalid value".into()));
    refused(
        h.create_grant(&writer, "apps/k", "", &["Decrypt"]).await,
        Code::InvalidArgument,
        "the API server refused the grant: spec.expiresAt: Invalid value",
    );
    h.retirer
        .refuse_next_create(CreateGrantError::Backend(BackendError::new(std::io::Error::other("etcd down"))));
    refused(
        h.create_grant(&writer, "apps/k", "", &["Decrypt"]).await,
        Code::Unavailable,
        "failed to create the grant",
    );

    // Every call is audited: the parent grant that allowed it, the grant it created.
    let lines = h.audit.lines();
    let line = |i: usize| {
        let l = &lines[i];
        (
            l["operation"].as_str(),
            l["key"].as_str(),
            l["result"].as_str(),
            l["createdGrantId"].as_str(),
            l["grantId"].as_str(),
        )
    };
    assert_eq!(line(0), (Some("CreateGrant"), Some("apps/k"), Some("OK"), Some("created-1"), None));
    assert_eq!(line(2), (Some("CreateGrant"), Some("apps/k"), Some("PermissionDenied"), None, None));
    assert_eq!(
        line(4),
        (Some("CreateGrant"), Some("apps/k"), Some("OK"), Some("created-3"), Some("grant-parent"))
    );
    assert_eq!(lines[0]["principal"], user("apps", "writer"));
    h.stop().await;
}

#[tokio::test]
async fn keys_that_are_not_enabled_refuse_every_cryptographic_operation() {
    let h = Harness::start().await;
    h.add_key(key("apps", "k", K, web_only()), 1);
    h.add_key(key("apps", "spare", SPARE, web_only()), 1);
    let web = token("apps", "web");
    let blob = h.encrypt(&web, "apps/k", b"kept", &[]).await.unwrap().ciphertext_blob;
    let spare_blob = h.encrypt(&web, "apps/spare", b"spare", &[]).await.unwrap().ciphertext_blob;

    for state in [
        KeyState::Disabled,
        KeyState::PendingDeletion,
        KeyState::Creating,
        KeyState::PendingImport,
        KeyState::Destroyed,
    ] {
        h.change_key("apps", "k", |k| k.info.state = state);
        let refusal = format!(
            "key apps/k is {}; it refuses cryptographic operations until it is Enabled",
            state.as_str()
        );
        let code = Code::FailedPrecondition;
        refused(h.encrypt(&web, "apps/k", b"x", &[]).await, code, &refusal);
        refused(h.decrypt(&web, &blob, &[], "").await, code, &refusal);
        refused(h.data_key(&web, "apps/k", &[], 0).await, code, &refusal);
        refused(h.data_key_only(&web, "apps/k", &[], 0).await, code, &refusal);
        refused(
            h.re_encrypt(&web, re_encrypt_request(&blob, &[], "", "apps/spare", &[])).await,
            code,
            &refusal,
        );
        refused(
            h.re_encrypt(&web, re_encrypt_request(&spare_blob, &[], "", "apps/k", &[])).await,
            code,
            &refusal,
        );
        // DescribeKey still answers an authorized caller, and shows the state.
        assert_eq!(h.describe(&web, "apps/k").await.unwrap().state, state.as_str());
        // Authorization comes first: a caller with no right learns nothing of the state.
        forbidden(
            &h,
            h.encrypt(&token("apps", "intruder"), "apps/k", b"x", &[]).await,
            "apps/k",
            "Encrypt",
            &not_allowed_by_policy(&user("apps", "intruder"), "Encrypt", "apps/k"),
        );
    }
    // Disabling is reversible: Enabled again, the ciphertext decrypts.
    h.change_key("apps", "k", |k| k.info.state = KeyState::Enabled);
    assert_eq!(h.decrypt(&web, &blob, &[], "").await.unwrap().plaintext, b"kept");
    h.stop().await;
}

#[tokio::test]
async fn a_key_without_a_usable_current_version_refuses_to_encrypt() {
    let h = Harness::start().await;
    h.add_key(key("apps", "k", K, web_only()), 1);
    let web = token("apps", "web");
    let blob = h.encrypt(&web, "apps/k", b"v1", &[]).await.unwrap().ciphertext_blob;
    let refusal = "key apps/k has no usable current version yet";
    let check = async |h: &Harness| {
        refused(h.encrypt(&web, "apps/k", b"x", &[]).await, Code::FailedPrecondition, refusal);
        refused(h.data_key(&web, "apps/k", &[], 0).await, Code::FailedPrecondition, refusal);
        refused(h.data_key_only(&web, "apps/k", &[], 0).await, Code::FailedPrecondition, refusal);
        refused(
            h.re_encrypt(&web, re_encrypt_request(&blob, &[], "", "apps/k", &[])).await,
            Code::FailedPrecondition,
            refusal,
        );
        // Decryption needs no current version: the blob names its own.
        assert_eq!(h.decrypt(&web, &blob, &[], "").await.unwrap().plaintext, b"v1");
    };

    // Enabled, but the status names no current version.
    h.change_key("apps", "k", |k| k.info.current_version = None);
    check(&h).await;
    // The status names version 2, which the material does not hold.
    h.change_key("apps", "k", |k| {
        k.info.current_version = Some(2);
        k.versions = vec![1, 2];
    });
    check(&h).await;

    // Material wrapped by another root key: an internal failure, with no detail for the caller.
    let other_root = RootKey::from_material(KeyMaterial::generate().unwrap());
    h.add_key_wrapped_by(&other_root, key("apps", "foreign", SPARE, web_only()), 1);
    refused(
        h.encrypt(&web, "apps/foreign", b"x", &[]).await,
        Code::Internal,
        "the key's material cannot be used",
    );
    // A keyId that is not a UUID cannot be written into a ciphertext.
    h.add_key(key("apps", "odd", "not-a-uuid", web_only()), 1);
    refused(
        h.encrypt(&web, "apps/odd", b"x", &[]).await,
        Code::FailedPrecondition,
        "key apps/odd has no valid keyId",
    );
    h.stop().await;
}

#[tokio::test]
async fn a_deny_of_decrypt_cannot_be_sidestepped_by_re_encrypting_into_a_key_of_ones_own() {
    // The attack of issue 12: the attacker may use apps/src through RBAC (every verb), a
    // policy statement denies it Decrypt, and it controls partner/mine.
    let h = Harness::start().await;
    let attacker = sa("partner", "attacker");
    let src = delegating(vec![
        allow("owner", sa("apps", "owner"), &[Op::Encrypt]),
        allow("reader", sa("apps", "reader"), &[Op::Decrypt]),
        deny("no-decrypt", attacker.clone(), &[Op::Decrypt]),
    ]);
    h.add_key(key("apps", "src", K, src), 1);
    for op in Op::ALL {
        h.rbac.allow(&user("partner", "attacker"), op.rbac_verb(), "apps", "src");
    }
    h.add_key(key("partner", "mine", MINE, policy_only(vec![allow("self", attacker, &Op::ALL)])), 1);
    let context = [("tenant", "apps")];
    let blob = h
        .encrypt(&token("apps", "owner"), "apps/src", b"tenant secret", &context)
        .await
        .unwrap()
        .ciphertext_blob;
    let mallory = token("partner", "attacker");

    forbidden(
        &h,
        h.decrypt(&mallory, &blob, &context, "").await,
        K,
        "Decrypt",
        &denied_by_policy("partner", "attacker", "Decrypt", "apps/src", "no-decrypt", "Decrypt"),
    );
    // ReEncrypt out of the key is Decrypt into a key of one's own: the Deny refuses it too,
    // to any destination, before RBAC is asked.
    for destination in ["partner/mine", "apps/src"] {
        forbidden(
            &h,
            h.re_encrypt(&mallory, re_encrypt_request(&blob, &context, "", destination, &[])).await,
            K,
            "ReEncryptFrom",
            &denied_by_policy("partner", "attacker", "ReEncryptFrom", "apps/src", "no-decrypt", "Decrypt"),
        );
    }
    assert!(h.rbac.asked().is_empty(), "a Deny answers before RBAC");
    let line = h.audit.lines().pop().unwrap();
    assert_eq!(line["operation"], "ReEncrypt");
    // The line names the source it was refused (and its context's keys), and no destination:
    // none was looked at.
    assert_eq!((line["sourceKey"].as_str(), line["sourceKeyVersion"].as_u64()), (Some("apps/src"), Some(1)));
    assert_eq!(line["sourceEncryptionContextKeys"], json!(["tenant"]));
    assert_eq!((line["key"].as_str(), line["keyVersion"].as_u64()), (None, None));
    assert_eq!(line["result"], "PermissionDenied");

    // An Allow is not widened: Decrypt does not allow ReEncryptFrom …
    forbidden(
        &h,
        h.re_encrypt(&token("apps", "reader"), re_encrypt_request(&blob, &context, "", "partner/mine", &[]))
            .await,
        K,
        "ReEncryptFrom",
        &not_allowed(&user("apps", "reader"), "ReEncryptFrom", "apps/src"),
    );
    // … nor ReEncryptFrom ReEncryptTo.
    h.change_key("apps", "src", |k| {
        k.policy.statements.push(allow("migrate", sa("apps", "reader"), &[Op::ReEncryptFrom]));
    });
    forbidden(
        &h,
        h.re_encrypt(&token("apps", "reader"), re_encrypt_request(&blob, &context, "", "apps/src", &[]))
            .await,
        "apps/src",
        "ReEncryptTo",
        &not_allowed(&user("apps", "reader"), "ReEncryptTo", "apps/src"),
    );
    h.stop().await;
}

#[tokio::test]
async fn a_deny_refuses_every_operation_that_implies_it_through_the_service() {
    // The intruder may do everything with apps/k but what one Deny statement names, and
    // everything with partner/mine, a key it controls.
    let h = Harness::start().await;
    let intruder = sa("apps", "intruder");
    h.add_key(key("apps", "k", K, web_only()), 1);
    h.add_key(key("partner", "mine", MINE, policy_only(vec![allow("self", intruder.clone(), &Op::ALL)])), 1);
    let it = token("apps", "intruder");
    let k_blob = h.encrypt(&token("apps", "web"), "apps/k", b"theirs", &[]).await.unwrap().ciphertext_blob;
    let mine_blob = h.encrypt(&it, "partner/mine", b"mine", &[]).await.unwrap().ciphertext_blob;
    h.directory.grants.apply(grant("for-intruder", "grant-1", sa("partner", "reader"), &[Op::Decrypt]));

    for (denied, refusals) in crate::domain::DENY_TABLE {
        h.change_key("apps", "k", |k| {
            k.policy = policy_only(vec![
                allow("web", sa("apps", "web"), &Op::ALL),
                allow("intruder", intruder.clone(), &Op::ALL),
                deny("no", intruder.clone(), &[*denied]),
            ]);
        });
        for op in Op::ALL {
            let outcome = match op {
                Op::Encrypt => h.encrypt(&it, "apps/k", b"x", &[]).await.map(drop),
                Op::Decrypt => h.decrypt(&it, &k_blob, &[], "").await.map(drop),
                Op::GenerateDataKey => h.data_key(&it, "apps/k", &[], 0).await.map(drop),
                Op::GenerateDataKeyWithoutPlaintext => h.data_key_only(&it, "apps/k", &[], 0).await.map(drop),
                Op::ReEncryptFrom => h
                    .re_encrypt(&it, re_encrypt_request(&k_blob, &[], "", "partner/mine", &[]))
                    .await
                    .map(drop),
                Op::ReEncryptTo => {
                    h.re_encrypt(&it, re_encrypt_request(&mine_blob, &[], "", "apps/k", &[])).await.map(drop)
                }
                Op::DescribeKey => h.describe(&it, "apps/k").await.map(drop),
                Op::RetireGrant => h.retire(&it, "apps/for-intruder").await.map(drop),
                // A grant that gives what the row denies is refused too (right_to_grant):
                // give something else, so that only a Deny of CreateGrant refuses it.
                Op::CreateGrant => {
                    let gives = if *denied == Op::DescribeKey { "Encrypt" } else { "DescribeKey" };
                    h.create_grant(&it, "apps/k", "", &[gives]).await.map(drop)
                }
            };
            if refusals.contains(&op) {
                let name = match op {
                    Op::Decrypt | Op::ReEncryptFrom => K,
                    Op::RetireGrant => "apps/for-intruder",
                    _ => "apps/k",
                };
                let reason = match op {
                    // CreateGrant's refusal says what the new grant may not give.
                    Op::CreateGrant => format!(
                        r#"system:serviceaccount:apps:intruder may not create this grant on key apps/k: the key policy denies system:serviceaccount:apps:intruder {} (statement "no")"#,
                        denied.as_str()
                    ),
                    _ => denied_by_policy("apps", "intruder", op.as_str(), "apps/k", "no", denied.as_str()),
                };
                forbidden(&h, outcome, name, op.as_str(), &reason);
            } else {
                outcome.unwrap_or_else(|e| panic!("a Deny of {denied:?} refused {op:?}: {e:?}"));
            }
        }
    }
    assert!(h.rbac.asked().is_empty());
    h.stop().await;
}

#[tokio::test]
async fn bad_requests_are_refused_with_precise_errors() {
    let h = Harness::start().await;
    h.add_key(key("apps", "k", K, web_only()), 1);
    let web = token("apps", "web");
    let bad = Code::InvalidArgument;

    // Plaintext: 1 to 4096 bytes.
    refused(h.encrypt(&web, "apps/k", b"", &[]).await, bad, "plaintext is empty");
    refused(
        h.encrypt(&web, "apps/k", &[0; MAX_PLAINTEXT_LEN + 1], &[]).await,
        bad,
        "plaintext is 4097 bytes; Encrypt takes at most 4096 (use GenerateDataKey and encrypt locally)",
    );
    h.encrypt(&web, "apps/k", &[0; MAX_PLAINTEXT_LEN], &[]).await.unwrap();

    // Data keys: 0 means 32 bytes; at most 1024.
    for (asked, got) in [(0, 32), (1, 1), (MAX_RANDOM_BYTES, 1024)] {
        let dk = h.data_key(&web, "apps/k", &[], asked).await.unwrap();
        assert_eq!(dk.plaintext.len(), got, "{asked}");
        let only = h.data_key_only(&web, "apps/k", &[], asked).await.unwrap();
        assert_eq!(h.decrypt(&web, &only.ciphertext_blob, &[], "").await.unwrap().plaintext.len(), got);
    }
    let too_many = "number_of_bytes is 1025; the most is 1024";
    refused(h.data_key(&web, "apps/k", &[], MAX_RANDOM_BYTES + 1).await, bad, too_many);
    refused(h.data_key_only(&web, "apps/k", &[], MAX_RANDOM_BYTES + 1).await, bad, too_many);

    // Random bytes: 1 to 1024.
    for n in [0, MAX_RANDOM_BYTES + 1] {
        refused(h.random(&web, n).await, bad, &format!("number_of_bytes is {n}; it must be from 1 to 1024"));
    }
    for n in [1, MAX_RANDOM_BYTES] {
        assert_eq!(h.random(&web, n).await.unwrap().plaintext.len(), n as usize);
    }

    // Encryption context: at most 64 pairs and 8192 bytes of keys and values.
    let pairs =
        |n: usize| -> Vec<(String, String)> { (0..n).map(|i| (format!("k{i}"), String::new())).collect() };
    let (most, one_more) = (pairs(MAX_CONTEXT_PAIRS), pairs(MAX_CONTEXT_PAIRS + 1));
    h.encrypt(&web, "apps/k", b"x", &borrowed(&most)).await.unwrap();
    let too_many_pairs = "encryption context has 65 pairs; the most is 64";
    refused(h.encrypt(&web, "apps/k", b"x", &borrowed(&one_more)).await, bad, too_many_pairs);
    refused(h.decrypt(&web, b"", &borrowed(&one_more), "").await, bad, too_many_pairs);
    refused(h.data_key(&web, "apps/k", &borrowed(&one_more), 0).await, bad, too_many_pairs);
    refused(
        h.re_encrypt(&web, re_encrypt_request(b"", &borrowed(&one_more), "", "apps/k", &[])).await,
        bad,
        too_many_pairs,
    );
    let (full, over) = ("v".repeat(MAX_CONTEXT_BYTES - 1), "v".repeat(MAX_CONTEXT_BYTES));
    h.encrypt(&web, "apps/k", b"x", &[("k", &full)]).await.unwrap();
    refused(
        h.encrypt(&web, "apps/k", b"x", &[("k", &over)]).await,
        bad,
        "encryption context is 8193 bytes; the most is 8192",
    );

    // Key names.
    refused(h.encrypt(&web, "", b"x", &[]).await, bad, "key is required (namespace/name or keyId)");
    refused(h.describe(&web, "").await, bad, "key is required (namespace/name or keyId)");
    refused(h.encrypt(&web, &"a".repeat(321), b"x", &[]).await, bad, "key name is too long");
    let longest = "a".repeat(320);
    // A key that does not exist is refused as one the caller may not use (no oracle); the
    // audit line says which it was.
    forbidden(
        &h,
        h.encrypt(&web, &longest, b"x", &[]).await,
        &longest,
        "Encrypt",
        &format!("key {longest:?} not found"),
    );
    forbidden(
        &h,
        h.encrypt(&web, "apps/missing", b"x", &[]).await,
        "apps/missing",
        "Encrypt",
        r#"key "apps/missing" not found"#,
    );
    let earlier = format!("key {EARLIER:?} not found");
    forbidden(&h, h.data_key(&web, EARLIER, &[], 0).await, EARLIER, "GenerateDataKey", &earlier);
    h.stop().await;
}

#[tokio::test]
async fn bad_ciphertexts_are_refused_precisely_and_without_an_oracle() {
    let h = Harness::start().await;
    h.add_key(key("apps", "k", K, web_only()), 1);
    h.add_key(key("apps", "other", SPARE, web_only()), 1);
    let web = token("apps", "web");
    let purpose = [("purpose", "test")];
    let good = h.encrypt(&web, "apps/k", b"payload", &purpose).await.unwrap().ciphertext_blob;
    let changed = |change: fn(&mut Vec<u8>)| {
        let mut blob = good.clone();
        change(&mut blob);
        blob
    };

    // What the structure gives away is said precisely, before any key is used.
    let smallest = 1 + 16 + 4 + crate::crypto::SEAL_OVERHEAD;
    let structural = [
        ("empty", Vec::new(), "ciphertext blob is empty".to_owned()),
        (
            "a stub",
            good[..30].to_vec(),
            "ciphertext blob is 30 bytes, too short to be a kubekms ciphertext".into(),
        ),
        (
            "one byte short of the smallest",
            good[..smallest - 1].to_vec(),
            format!("ciphertext blob is {} bytes, too short to be a kubekms ciphertext", smallest - 1),
        ),
        (
            "too long",
            vec![1; MAX_BLOB_LEN + 1],
            format!("ciphertext blob is {} bytes; the most is {MAX_BLOB_LEN}", MAX_BLOB_LEN + 1),
        ),
        ("unknown format", changed(|b| b[0] = 2), "ciphertext blob has unknown format version 2".into()),
        (
            "version 0",
            changed(|b| b[17..21].copy_from_slice(&[0; 4])),
            "ciphertext blob names key version 0, which never exists".into(),
        ),
    ];
    for (what, blob, message) in structural {
        let err = h.decrypt(&web, &blob, &purpose, "").await.unwrap_err();
        assert_eq!((err.code(), err.message()), (Code::InvalidArgument, message.as_str()), "{what}");
    }

    // Every authentication failure is one and the same.
    let random_body: Vec<u8> =
        good[..21].iter().copied().chain((21..good.len()).map(|i| (i * 31 % 251) as u8)).collect();
    let forged = [
        ("truncated by one byte", good[..good.len() - 1].to_vec()),
        ("the last byte flipped", changed(|b| *b.last_mut().unwrap() ^= 1)),
        ("the salt changed", changed(|b| b[21] ^= 1)),
        ("a random body under a genuine header", random_body),
    ];
    for (what, blob) in forged {
        let err = h.decrypt(&web, &blob, &purpose, "").await.unwrap_err();
        assert_eq!((err.code(), err.message()), (Code::InvalidArgument, "decryption failed"), "{what}");
    }
    for context in [&[("purpose", "other")][..], &[][..], &[("purpose", "test"), ("extra", "1")][..]] {
        let err = h.decrypt(&web, &good, context, "").await.unwrap_err();
        assert_eq!((err.code(), err.message()), (Code::InvalidArgument, "decryption failed"), "{context:?}");
    }

    // The header names the key and the version.
    let unknown = "07070707-0707-0707-0707-070707070707";
    forbidden(
        &h,
        h.decrypt(&web, &changed(|b| b[1..17].copy_from_slice(&[7; 16])), &purpose, "").await,
        unknown,
        "Decrypt",
        &format!("key {unknown:?} not found"),
    );
    refused(
        h.decrypt(&web, &changed(|b| b[17..21].copy_from_slice(&9u32.to_be_bytes())), &purpose, "").await,
        Code::NotFound,
        "key apps/k does not hold version 9",
    );

    // A key given with the ciphertext must be the ciphertext's.
    refused(
        h.decrypt(&web, &good, &purpose, "apps/other").await,
        Code::InvalidArgument,
        "the ciphertext is under key apps/k, not apps/other",
    );
    // The key given is compared, not looked up: whether another key exists is not told.
    refused(
        h.decrypt(&web, &good, &purpose, "apps/missing").await,
        Code::InvalidArgument,
        "the ciphertext is under key apps/k, not apps/missing",
    );
    assert_eq!(h.decrypt(&web, &good, &purpose, "apps/k").await.unwrap().plaintext, b"payload");
    assert_eq!(h.decrypt(&web, &good, &purpose, K).await.unwrap().plaintext, b"payload");
    refused(
        h.re_encrypt(&web, re_encrypt_request(&good, &purpose, "apps/other", "apps/other", &[])).await,
        Code::InvalidArgument,
        "the ciphertext is under key apps/k, not apps/other",
    );
    // Only a caller authorized on the ciphertext's key learns which key that is.
    forbidden(
        &h,
        h.decrypt(&token("apps", "intruder"), &good, &purpose, "apps/other").await,
        K,
        "Decrypt",
        &not_allowed_by_policy(&user("apps", "intruder"), "Decrypt", "apps/k"),
    );
    h.stop().await;
}

#[tokio::test]
async fn every_operation_round_trips() {
    let h = Harness::start().await;
    let created: Timestamp = "2026-01-02T03:04:05Z".parse().unwrap();
    h.add_key(
        Key {
            description: "round trips".into(),
            created: Some(created),
            next_rotation: Some("2027-01-02T03:04:05Z".parse().unwrap()),
            ..key("apps", "k", K, web_only())
        },
        2,
    );
    h.add_key(
        Key {
            origin: Origin::External,
            automatic_rotation: false,
            rotation_period_days: 90,
            deletion: Some("2026-02-01T00:00:00Z".parse().unwrap()),
            ..key("apps", "spare", SPARE, web_only())
        },
        1,
    );
    let web = token("apps", "web");
    let at = |key: &str, key_id: &str, version| {
        Some(KeyVersionRef { key: key.into(), key_id: key_id.into(), version })
    };

    // Encrypt → Decrypt, bound to the context.
    let e = h.encrypt(&web, "apps/k", b"hello", &[("app", "web")]).await.unwrap();
    assert_eq!(e.key, at("apps/k", K, 1));
    let d = h.decrypt(&web, &e.ciphertext_blob, &[("app", "web")], "").await.unwrap();
    assert_eq!((d.plaintext.as_slice(), d.key), (&b"hello"[..], at("apps/k", K, 1)));

    // After a rotation new ciphertexts use version 2 and version 1 still decrypts.
    h.change_key("apps", "k", |k| {
        k.info.current_version = Some(2);
        k.versions = vec![1, 2];
    });
    let v2 = h.encrypt(&web, "apps/k", b"newer", &[]).await.unwrap();
    assert_eq!(v2.key, at("apps/k", K, 2));
    assert_eq!(h.decrypt(&web, &v2.ciphertext_blob, &[], "").await.unwrap().plaintext, b"newer");
    assert_eq!(h.decrypt(&web, &e.ciphertext_blob, &[("app", "web")], "").await.unwrap().plaintext, b"hello");

    // A data key, in plaintext and wrapped; and wrapped only.
    let dk = h.data_key(&web, "apps/k", &[("file", "a")], 0).await.unwrap();
    assert_eq!((dk.plaintext.len(), dk.key.clone()), (32, at("apps/k", K, 2)));
    assert_eq!(
        h.decrypt(&web, &dk.ciphertext_blob, &[("file", "a")], "").await.unwrap().plaintext,
        dk.plaintext
    );
    let only = h.data_key_only(&web, "apps/k", &[], 16).await.unwrap();
    assert_eq!(only.key, at("apps/k", K, 2));
    assert_eq!(h.decrypt(&web, &only.ciphertext_blob, &[], "").await.unwrap().plaintext.len(), 16);

    // ReEncrypt to another key and context; and to the same key's current version.
    let moved = h
        .re_encrypt(
            &web,
            re_encrypt_request(
                &e.ciphertext_blob,
                &[("app", "web")],
                "apps/k",
                "apps/spare",
                &[("app", "moved")],
            ),
        )
        .await
        .unwrap();
    assert_eq!((moved.source_key, moved.key), (at("apps/k", K, 1), at("apps/spare", SPARE, 1)));
    let d = h.decrypt(&web, &moved.ciphertext_blob, &[("app", "moved")], "").await.unwrap();
    assert_eq!((d.plaintext.as_slice(), d.key), (&b"hello"[..], at("apps/spare", SPARE, 1)));
    refused(
        h.decrypt(&web, &moved.ciphertext_blob, &[("app", "web")], "").await,
        Code::InvalidArgument,
        "decryption failed",
    );
    let rotated = h
        .re_encrypt(&web, re_encrypt_request(&e.ciphertext_blob, &[("app", "web")], "", K, &[("app", "web")]))
        .await
        .unwrap();
    assert_eq!((rotated.source_key, rotated.key), (at("apps/k", K, 1), at("apps/k", K, 2)));
    assert_eq!(
        h.decrypt(&web, &rotated.ciphertext_blob, &[("app", "web")], "").await.unwrap().plaintext,
        b"hello"
    );

    // DescribeKey: metadata, never material.
    assert_eq!(
        h.describe(&web, "apps/k").await.unwrap(),
        KeyMetadata {
            valid_to: String::new(),
            key: "apps/k".into(),
            key_id: K.into(),
            description: "round trips".into(),
            state: "Enabled".into(),
            key_spec: "SYMMETRIC_DEFAULT".into(),
            key_usage: "ENCRYPT_DECRYPT".into(),
            origin: "KUBEKMS".into(),
            current_version: 2,
            versions: vec![1, 2],
            creation_time: "2026-01-02T03:04:05Z".into(),
            next_rotation_time: "2027-01-02T03:04:05Z".into(),
            deletion_time: String::new(),
            automatic_rotation: true,
            rotation_period_days: 365,
        }
    );
    let spare = h.describe(&web, SPARE).await.unwrap();
    assert_eq!(
        (spare.origin.as_str(), spare.deletion_time.as_str(), spare.creation_time.as_str()),
        ("EXTERNAL", "2026-02-01T00:00:00Z", "")
    );
    assert_eq!((spare.automatic_rotation, spare.rotation_period_days), (false, 90));

    // The request id comes back (and is made up when the caller sends none).
    let mut r = authed(&web, GenerateRandomRequest { number_of_bytes: 8 });
    r.metadata_mut().insert("x-request-id", "req-42".parse().unwrap());
    let response = h.client.clone().generate_random(r).await.unwrap();
    assert_eq!(response.metadata().get("x-request-id").unwrap().to_str().unwrap(), "req-42");
    let response = h
        .client
        .clone()
        .generate_random(authed(&web, GenerateRandomRequest { number_of_bytes: 8 }))
        .await
        .unwrap();
    let made_up = response.metadata().get("x-request-id").unwrap().to_str().unwrap();
    assert!(uuid::Uuid::parse_str(made_up).is_ok(), "{made_up}");
    h.stop().await;
}

/// An audit line without what every line has (time, chain, component, request id): what
/// happened, every field of it, so that a field that should be absent is seen too.
fn what_happened(line: &Value) -> Value {
    let mut fields = line.as_object().unwrap().clone();
    for every_line in ["time", "seq", "prev", "mac", "component", "requestId"] {
        fields.remove(every_line).unwrap();
    }
    Value::Object(fields)
}

#[tokio::test]
async fn every_call_writes_exactly_one_audit_line_and_no_secret() {
    let h = Harness::start().await;
    let policy = policy_only(vec![
        allow("web", sa("apps", "web"), &Op::ALL),
        deny("no-intruder", sa("apps", "intruder"), &[Op::Decrypt]),
    ]);
    h.add_key(key("apps", "k", K, policy.clone()), 1);
    h.add_key(key("apps", "spare", SPARE, policy), 1);
    h.directory.grants.apply(grant("reader", "grant-1", sa("partner", "reader"), &[Op::Decrypt]));
    let (web, reader, intruder) =
        (token("apps", "web"), token("partner", "reader"), token("apps", "intruder"));
    let secret = b"audit-plaintext-5f3a9c";
    let context = [("tenant", "secret-tenant-value")];

    let mut r = authed(
        &web,
        EncryptRequest {
            key: "apps/k".into(),
            plaintext: secret.to_vec(),
            encryption_context: ctx(&context),
        },
    );
    r.metadata_mut().insert("x-request-id", "req-encrypt".parse().unwrap());
    let blob = h.client.clone().encrypt(r).await.unwrap().into_inner().ciphertext_blob;
    h.decrypt(&reader, &blob, &context, "").await.unwrap();
    h.decrypt(&intruder, &blob, &context, "").await.unwrap_err();
    h.client
        .clone()
        .generate_random(Request::new(GenerateRandomRequest { number_of_bytes: 8 }))
        .await
        .unwrap_err();
    let dk = h.data_key(&web, "apps/k", &context, 0).await.unwrap();
    h.re_encrypt(
        &web,
        re_encrypt_request(&blob, &context, "", "apps/spare", &[("moved", "secret-moved-value")]),
    )
    .await
    .unwrap();
    let mut tampered = blob.clone();
    *tampered.last_mut().unwrap() ^= 1;
    h.decrypt(&web, &tampered, &context, "").await.unwrap_err();
    h.encrypt(&web, "apps/missing", secret, &[]).await.unwrap_err();
    let random = h.random(&web, 16).await.unwrap().plaintext;
    h.describe(&web, "apps/k").await.unwrap();
    h.data_key(&web, "apps/k", &context, MAX_RANDOM_BYTES + 1).await.unwrap_err();

    let lines = h.audit.lines();
    let (web_user, intruder_user) = (user("apps", "web"), user("apps", "intruder"));
    let denied = r#"system:serviceaccount:apps:intruder is denied Decrypt on key apps/k by the key policy (statement "no-intruder")"#;
    let (k, spare) = (("apps/k", K), ("apps/spare", SPARE));
    let expected = [
        json!({"operation": "Encrypt", "principal": web_user, "key": k.0, "keyId": k.1, "keyVersion": 1,
            "encryptionContextKeys": ["tenant"], "result": "OK"}),
        json!({"operation": "Decrypt", "principal": user("partner", "reader"), "key": k.0, "keyId": k.1,
            "keyVersion": 1, "grantId": "grant-1", "encryptionContextKeys": ["tenant"], "result": "OK"}),
        json!({"operation": "Decrypt", "principal": intruder_user, "key": k.0, "keyId": k.1, "keyVersion": 1,
            "encryptionContextKeys": ["tenant"], "result": "PermissionDenied", "reason": denied}),
        json!({"operation": "GenerateRandom", "principal": "", "result": "Unauthenticated",
            "reason": "missing bearer token: send `authorization: Bearer <ServiceAccount token>`"}),
        json!({"operation": "GenerateDataKey", "principal": web_user, "key": k.0, "keyId": k.1,
            "keyVersion": 1, "encryptionContextKeys": ["tenant"], "result": "OK"}),
        json!({"operation": "ReEncrypt", "principal": web_user, "key": spare.0, "keyId": spare.1,
            "keyVersion": 1, "sourceKey": k.0, "sourceKeyId": k.1, "sourceKeyVersion": 1,
            "sourceEncryptionContextKeys": ["tenant"], "encryptionContextKeys": ["moved"], "result": "OK"}),
        json!({"operation": "Decrypt", "principal": web_user, "key": k.0, "keyId": k.1, "keyVersion": 1,
            "encryptionContextKeys": ["tenant"], "result": "InvalidArgument", "reason": "decryption failed"}),
        json!({"operation": "Encrypt", "principal": web_user, "result": "PermissionDenied",
            "reason": r#"key "apps/missing" not found"#}),
        json!({"operation": "GenerateRandom", "principal": web_user, "result": "OK"}),
        json!({"operation": "DescribeKey", "principal": web_user, "key": k.0, "keyId": k.1, "result": "OK"}),
        json!({"operation": "GenerateDataKey", "principal": web_user, "encryptionContextKeys": ["tenant"],
            "result": "InvalidArgument", "reason": "number_of_bytes is 1025; the most is 1024"}),
    ];
    assert_eq!(lines.len(), expected.len(), "one line per call");
    for (i, (line, want)) in lines.iter().zip(expected).enumerate() {
        assert_eq!(what_happened(line), want, "line {}", i + 1);
        assert_eq!(line["component"], "server");
    }
    assert_eq!(lines[0]["requestId"], "req-encrypt");

    let text = h.audit.text();
    let forbidden = [
        String::from_utf8(secret.to_vec()).unwrap(),
        B64.encode(secret),
        "secret-tenant-value".into(),
        "secret-moved-value".into(),
        B64.encode(&dk.plaintext),
        crate::crypto::hex(&dk.plaintext),
        B64.encode(&random),
        web.clone(),
        reader.clone(),
    ];
    for f in &forbidden {
        assert!(!text.contains(f.as_str()), "the audit log holds {f:?}");
    }
    assert_eq!(crate::audit::verify(text.as_bytes(), Some(&h.root)).unwrap().lines, 11);
    h.stop().await;
}

#[tokio::test]
async fn a_call_that_cannot_be_audited_fails_closed() {
    let h = Harness::start().await;
    h.add_key(key("apps", "k", K, web_only()), 1);
    let web = token("apps", "web");
    let blob = h.encrypt(&web, "apps/k", b"before", &[]).await.unwrap().ciphertext_blob;

    h.audit.fail(true);
    let closed = "the audit log cannot be written";
    refused(h.encrypt(&web, "apps/k", b"x", &[]).await, Code::Unavailable, closed);
    // No plaintext comes back: the call fails as a whole.
    refused(h.decrypt(&web, &blob, &[], "").await, Code::Unavailable, closed);
    refused(h.data_key(&web, "apps/k", &[], 0).await, Code::Unavailable, closed);
    refused(h.data_key_only(&web, "apps/k", &[], 0).await, Code::Unavailable, closed);
    refused(
        h.re_encrypt(&web, re_encrypt_request(&blob, &[], "", "apps/k", &[])).await,
        Code::Unavailable,
        closed,
    );
    refused(h.random(&web, 8).await, Code::Unavailable, closed);
    refused(h.describe(&web, "apps/k").await, Code::Unavailable, closed);
    // A call refused anyway fails closed too: nobody learns anything that is not recorded.
    refused(h.decrypt(&token("apps", "intruder"), &blob, &[], "").await, Code::Unavailable, closed);
    refused(h.encrypt(&web, "apps/missing", b"x", &[]).await, Code::Unavailable, closed);
    refused(h.encrypt("not-a-token", "apps/k", b"x", &[]).await, Code::Unavailable, closed);
    assert_eq!(h.audit.lines().len(), 1, "nothing was written while the log failed");
    let metrics = h.metrics();
    let unavailable = r#"kubekms_operations_total{component="server",key="apps/k",operation="Decrypt",result="Unavailable"} 2"#;
    assert!(metrics.lines().any(|l| l == unavailable), "missing {unavailable} in\n{metrics}");

    // Once the log can be written again, so can calls, and the chain has no gap.
    h.audit.fail(false);
    assert_eq!(h.decrypt(&web, &blob, &[], "").await.unwrap().plaintext, b"before");
    assert_eq!(crate::audit::verify(h.audit.text().as_bytes(), Some(&h.root)).unwrap().lines, 2);
    h.stop().await;
}

#[tokio::test]
async fn every_call_is_counted_per_key_operation_and_result() {
    let h = Harness::start().await;
    h.add_key(key("apps", "k", K, web_only()), 1);
    h.add_key(key("apps", "spare", SPARE, web_only()), 1);
    let web = token("apps", "web");
    let blob = h.encrypt(&web, "apps/k", b"1", &[]).await.unwrap().ciphertext_blob;
    h.encrypt(&web, "apps/k", b"2", &[]).await.unwrap();
    h.encrypt(&web, "apps/spare", b"3", &[]).await.unwrap();
    h.decrypt(&token("apps", "intruder"), &blob, &[], "").await.unwrap_err();
    h.encrypt(&web, "apps/missing", b"4", &[]).await.unwrap_err();
    h.encrypt("not-a-token", "apps/k", b"5", &[]).await.unwrap_err();
    h.random(&web, 8).await.unwrap();

    let text = h.metrics();
    let counted = |key: &str, operation: &str, result: &str, n: u64| {
        format!(
            r#"kubekms_operations_total{{component="server",key="{key}",operation="{operation}",result="{result}"}} {n}"#
        )
    };
    for line in [
        counted("apps/k", "Encrypt", "OK", 2),
        counted("apps/spare", "Encrypt", "OK", 1),
        counted("apps/k", "Decrypt", "PermissionDenied", 1),
        // A key that does not exist, or a caller who is nobody, is counted under no key.
        counted("", "Encrypt", "PermissionDenied", 1),
        counted("", "Encrypt", "Unauthenticated", 1),
        counted("", "GenerateRandom", "OK", 1),
        r#"kubekms_operation_duration_seconds_count{component="server",operation="Encrypt"} 5"#.to_owned(),
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
    }
    let total: u64 = text
        .lines()
        .filter(|l| l.starts_with("kubekms_operations_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(total, 7, "every call counted once:\n{text}");
    h.stop().await;
}

#[tokio::test]
async fn a_caller_without_rights_learns_nothing_of_a_key_or_grant_in_any_rpc() {
    // The stranger may use partner/mine and nothing of apps/k; each call is made while
    // apps/k and its grant exist and again once they are gone: the answers are the same.
    let h = Harness::start().await;
    h.add_key(key("apps", "k", K, web_only()), 1);
    h.add_key(
        key("partner", "mine", MINE, policy_only(vec![allow("self", sa("partner", "stranger"), &Op::ALL)])),
        1,
    );
    h.directory.grants.apply(grant("g", "grant-1", sa("partner", "reader"), &[Op::Decrypt]));
    let web = token("apps", "web");
    let k_blob = h.encrypt(&web, "apps/k", b"theirs", &[]).await.unwrap().ciphertext_blob;
    let stranger = token("partner", "stranger");
    let mine_blob = h.encrypt(&stranger, "partner/mine", b"mine", &[]).await.unwrap().ciphertext_blob;

    let answers = async |h: &Harness| {
        let status = |r: Result<(), Status>| {
            let s = r.unwrap_err();
            (s.code(), s.message().to_owned())
        };
        vec![
            status(h.encrypt(&stranger, "apps/k", b"x", &[]).await.map(drop)),
            status(h.encrypt(&stranger, K, b"x", &[]).await.map(drop)),
            status(h.decrypt(&stranger, &k_blob, &[], "").await.map(drop)),
            status(h.decrypt(&stranger, &k_blob, &[], "partner/mine").await.map(drop)),
            status(h.data_key(&stranger, "apps/k", &[], 0).await.map(drop)),
            status(h.data_key_only(&stranger, "apps/k", &[], 0).await.map(drop)),
            status(
                h.re_encrypt(&stranger, re_encrypt_request(&k_blob, &[], "", "partner/mine", &[]))
                    .await
                    .map(drop),
            ),
            status(
                h.re_encrypt(&stranger, re_encrypt_request(&mine_blob, &[], "", "apps/k", &[]))
                    .await
                    .map(drop),
            ),
            status(h.describe(&stranger, "apps/k").await.map(drop)),
            status(h.retire(&stranger, "apps/g").await.map(drop)),
            status(h.retire(&stranger, "grant-1").await.map(drop)),
        ]
    };
    let while_there = answers(&h).await;
    h.directory.keys.delete("apps", "k");
    h.directory.grants.delete("apps", "g");
    let once_gone = answers(&h).await;
    assert_eq!(while_there, once_gone);
    let denied = |name: &str, op: &str| (Code::PermissionDenied, refusal(name, op));
    assert_eq!(
        while_there,
        vec![
            denied("apps/k", "Encrypt"),
            denied(K, "Encrypt"),
            denied(K, "Decrypt"),
            denied(K, "Decrypt"),
            denied("apps/k", "GenerateDataKey"),
            denied("apps/k", "GenerateDataKeyWithoutPlaintext"),
            denied(K, "ReEncryptFrom"),
            denied("apps/k", "ReEncryptTo"),
            denied("apps/k", "DescribeKey"),
            denied("apps/g", "RetireGrant"),
            denied("grant-1", "RetireGrant"),
        ]
    );
    // Nothing in the answers names the key: "apps/k" only where the caller wrote it.
    for (_, message) in &while_there {
        assert!(!message.contains("apps/k") || message.starts_with(r#"key "apps/k""#), "{message}");
    }
    // The audit lines tell the operator which was which.
    let lines = h.audit.lines();
    let reasons: Vec<&str> = lines[2..].iter().map(|l| l["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons[0], not_allowed_by_policy(&user("partner", "stranger"), "Encrypt", "apps/k"));
    assert_eq!(reasons[11], r#"key "apps/k" not found"#);
    assert_eq!(reasons[20], r#"grant "apps/g" not found"#);
    h.stop().await;
}

#[tokio::test]
async fn an_authorized_caller_still_gets_precise_errors() {
    let h = Harness::start().await;
    h.add_key(key("apps", "k", K, web_only()), 1);
    let web = token("apps", "web");
    let blob = h.encrypt(&web, "apps/k", b"x", &[]).await.unwrap().ciphertext_blob;
    h.change_key("apps", "k", |k| k.info.state = KeyState::Disabled);
    refused(
        h.decrypt(&web, &blob, &[], "").await,
        Code::FailedPrecondition,
        "key apps/k is Disabled; it refuses cryptographic operations until it is Enabled",
    );
    refused(
        h.decrypt(&web, &blob, &[], "apps/other").await,
        Code::InvalidArgument,
        "the ciphertext is under key apps/k, not apps/other",
    );
    h.stop().await;
}

#[tokio::test]
async fn the_transport_refuses_a_request_larger_than_the_limit_before_the_service_sees_it() {
    let h = Harness::start().await;
    h.add_key(key("apps", "k", K, web_only()), 1);
    let web = token("apps", "web");
    let huge = ctx(&[("padding", &"p".repeat(super::MAX_REQUEST_BYTES))]);
    let request = EncryptRequest { key: "apps/k".into(), plaintext: b"x".to_vec(), encryption_context: huge };
    let err = h.client.clone().encrypt(authed(&web, request)).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(h.audit.lines().is_empty(), "the service never saw it");
    h.stop().await;
}

#[tokio::test]
async fn a_flood_of_junk_pushes_out_no_valid_callers_cached_token_or_rbac_answer() {
    let setup = Setup {
        auth: Settings {
            rejected_cache_size: 8,
            reviews_per_client: "1000/1h".parse().unwrap(),
            ..Settings::default()
        },
        rbac_cache: CacheSettings { ttl: Duration::from_secs(3600), size: 100, denied_size: 8 },
        ..Setup::default()
    };
    let h = Harness::start_with(setup).await;
    h.add_key(key("apps", "k", K, delegating(Vec::new())), 1);
    h.rbac.allow(&user("apps", "writer"), "encrypt", "apps", "k");
    let writer = token("apps", "writer");
    h.encrypt(&writer, "apps/k", b"x", &[]).await.unwrap();
    assert_eq!((h.reviews.load(Ordering::SeqCst), h.rbac.asked().len()), (1, 1));

    // 50 junk tokens (each reviewed once, and rejected), and 50 questions about keys the
    // other ServiceAccount may not use.
    for i in 0..50 {
        refused(
            h.encrypt(&format!("junk-{i}"), "apps/k", b"x", &[]).await,
            Code::Unauthenticated,
            r#"invalid or expired token, or a token not meant for audience "kubekms""#,
        );
    }
    let other = token("apps", "other");
    for i in 0..50 {
        h.add_key(
            key("apps", &format!("k{i}"), &uuid::Uuid::new_v4().to_string(), delegating(Vec::new())),
            1,
        );
        h.encrypt(&other, &format!("apps/k{i}"), b"x", &[]).await.unwrap_err();
    }
    assert_eq!(h.reviews.load(Ordering::SeqCst), 52, "the junk, the writer, the other");
    assert_eq!(h.rbac.asked().len(), 51);

    // The writer is still served from both caches.
    h.encrypt(&writer, "apps/k", b"x", &[]).await.unwrap();
    assert_eq!((h.reviews.load(Ordering::SeqCst), h.rbac.asked().len()), (52, 51));
    h.stop().await;
}

/// Asserts that a call was refused for too many new tokens, with a retry hint of at most
/// `most` seconds (a little less once time has passed; never zero), the same in the message,
/// `retry-after` and `grpc-retry-pushback-ms`.
#[track_caller]
fn throttled<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, most: u64) {
    let status = result.unwrap_err();
    let hint = |name| status.metadata().get(name).map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
    let seconds = hint("retry-after").expect("a retry-after hint");
    assert!((1..=most).contains(&seconds), "{seconds}");
    assert_eq!(hint("grpc-retry-pushback-ms"), Some(seconds * 1000));
    let message = match code {
        Code::ResourceExhausted => format!("too many new tokens from this client; retry in {seconds} s"),
        _ => format!("the key API is reviewing too many new tokens; retry in {seconds} s"),
    };
    assert_eq!((status.code(), status.message()), (code, message.as_str()));
}

#[tokio::test]
async fn a_flood_of_invalid_tokens_costs_a_bounded_number_of_reviews_and_valid_callers_go_on() {
    let setup = Setup {
        auth: Settings {
            reviews_per_client: "5/1h".parse().unwrap(),
            reviews: "8/1h".parse().unwrap(),
            ..Settings::default()
        },
        ..Setup::default()
    };
    let h = Harness::start_with(setup).await;
    h.add_key(key("apps", "k", K, web_only()), 1);
    let web = token("apps", "web");
    let reviews = || h.reviews.load(Ordering::SeqCst);
    h.encrypt(&web, "apps/k", b"x", &[]).await.unwrap();

    // 100 invalid tokens from one client (127.0.0.1): its burst of 5 reviews (the valid
    // token had one), then RESOURCE_EXHAUSTED with a retry hint (one review every 720 s);
    // the valid caller, cached, is served throughout.
    let (mut rejected, mut exhausted) = (0, 0);
    for i in 0..100 {
        match h.encrypt(&format!("junk-{i}"), "apps/k", b"x", &[]).await {
            Err(s) if s.code() == Code::Unauthenticated => rejected += 1,
            other => {
                throttled(other, Code::ResourceExhausted, 720);
                exhausted += 1;
            }
        }
        if i % 10 == 0 {
            h.encrypt(&web, "apps/k", b"during", &[]).await.unwrap();
        }
    }
    assert_eq!((rejected, exhausted, reviews()), (4, 96, 5));
    h.encrypt(&web, "apps/k", b"after", &[]).await.unwrap();
    assert_eq!(reviews(), 5, "the valid caller never needed another review");
    // A new token from the flooding client waits its turn too, valid or not.
    throttled(h.encrypt(&token("apps", "owner"), "apps/k", b"x", &[]).await, Code::ResourceExhausted, 720);

    // Another client is counted apart, until everyone's limit (8) is reached.
    let mut elsewhere = h.client_from("127.0.0.2").await;
    let request =
        || EncryptRequest { key: "apps/k".into(), plaintext: b"x".to_vec(), encryption_context: ctx(&[]) };
    elsewhere.encrypt(authed(&web, request())).await.unwrap();
    assert_eq!(reviews(), 5, "a cached token is cached for every client");
    for i in 0..3 {
        let err = elsewhere.encrypt(authed(&format!("other-junk-{i}"), request())).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    assert_eq!(reviews(), 8);
    throttled(elsewhere.encrypt(authed("other-junk-3", request())).await, Code::Unavailable, 450);
    assert_eq!(reviews(), 8, "kube-apiserver saw 8 reviews for 106 new tokens");

    // Every call is audited, the throttled ones too.
    let lines = h.audit.lines();
    let count = |result: &str| lines.iter().filter(|l| l["result"] == result).count();
    assert_eq!((count("ResourceExhausted"), count("Unavailable"), count("Unauthenticated")), (97, 1, 7));
    h.stop().await;
}

#[tokio::test]
async fn a_stalled_audit_sink_fails_callers_closed_within_the_timeout() {
    let audit = AuditLimits { timeout: Duration::from_millis(200), queue: 16 };
    let h = Harness::start_with(Setup { audit, ..Setup::default() }).await;
    h.add_key(key("apps", "k", K, web_only()), 1);
    let web = token("apps", "web");
    let blob = h.encrypt(&web, "apps/k", b"before", &[]).await.unwrap().ciphertext_blob;

    h.audit.stall(true);
    let bound = Duration::from_secs(30);
    let closed = "the audit log cannot be written";
    let decrypt = tokio::time::timeout(bound, h.decrypt(&web, &blob, &[], "")).await;
    refused(decrypt.expect("returned before the bound"), Code::Unavailable, closed);
    // Many at once: each returns, none with a result.
    let calls = (0..20).map(|_| h.random(&web, 8));
    let answers = tokio::time::timeout(bound, futures::future::join_all(calls)).await.expect("returned");
    for answer in answers {
        refused(answer, Code::Unavailable, closed);
    }
    let metrics = h.metrics();
    let unavailable = r#"kubekms_operations_total{component="server",key="",operation="GenerateRandom",result="Unavailable"} 20"#;
    assert!(metrics.lines().any(|l| l == unavailable), "missing {unavailable} in\n{metrics}");

    // Once the sink moves again (and the writer has passed over the lines whose callers
    // gave up), so do calls; the chain has no gap. At most the line that was being written
    // when the sink stalled landed, for a caller told Unavailable.
    h.audit.stall(false);
    let recovered = async {
        loop {
            match h.decrypt(&web, &blob, &[], "").await {
                Err(s) if s.code() == Code::Unavailable => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                other => return other,
            }
        }
    };
    let recovered = tokio::time::timeout(bound, recovered).await.expect("calls go on once the sink does");
    assert_eq!(recovered.unwrap().plaintext, b"before");
    let text = h.audit.text();
    let lines = crate::audit::verify(text.as_bytes(), Some(&h.root)).unwrap().lines;
    let random_lines = text.matches(r#""operation":"GenerateRandom""#).count();
    assert!((2..=3).contains(&lines) && random_lines <= 1, "{lines} lines:\n{text}");
    h.stop().await;
}

#[tokio::test]
async fn no_more_calls_wait_on_a_stalled_audit_sink_than_its_queue_holds() {
    // Callers would wait an hour: only the bound on waiting lines lets the rest go.
    let audit = AuditLimits { timeout: Duration::from_secs(3600), queue: 2 };
    let h = Arc::new(Harness::start_with(Setup { audit, ..Setup::default() }).await);
    let web = token("apps", "web");
    h.audit.stall(true);
    let mut calls = tokio::task::JoinSet::new();
    let call = |calls: &mut tokio::task::JoinSet<_>| {
        let (h, web) = (h.clone(), web.clone());
        calls.spawn(async move { h.random(&web, 8).await });
    };
    call(&mut calls);
    h.audit.wait_until_held().await;
    // The writer is held in the first call's line: of ten more calls, two wait in the queue
    // and eight are refused at once.
    for _ in 0..10 {
        call(&mut calls);
    }
    for _ in 0..8 {
        let answer = tokio::time::timeout(Duration::from_secs(30), calls.join_next()).await;
        refused(
            answer.expect("returned before the bound").unwrap().unwrap(),
            Code::Unavailable,
            "the audit log cannot be written",
        );
    }
    assert!(calls.try_join_next().is_none(), "three calls still wait");
    assert_eq!(calls.len(), 3);
    h.audit.stall(false);
    while let Some(answer) = calls.join_next().await {
        assert_eq!(answer.unwrap().unwrap().plaintext.len(), 8);
    }
    assert_eq!(h.audit.lines().len(), 3);
    Arc::into_inner(h).unwrap().stop().await;
}

#[tokio::test]
async fn every_authorized_use_is_recorded_with_its_version_and_an_unauthorized_one_is_not() {
    use crate::domain::{UseKind, VersionRefusal};
    let h = Harness::start().await;
    h.add_key(key("apps", "k", K, web_only()), 2);
    h.add_key(key("apps", "spare", SPARE, web_only()), 1);
    let (web, intruder) = (token("apps", "web"), token("apps", "intruder"));
    let uses = |from: usize| h.uses.uses()[from..].to_vec();
    let at = |key: &str, version, kind| (key.to_owned(), version, kind);

    // Version 1 is current: every encryption under it, every decryption of its blobs.
    let v1 = h.encrypt(&web, "apps/k", b"one", &[]).await.unwrap().ciphertext_blob;
    h.data_key(&web, "apps/k", &[], 0).await.unwrap();
    h.data_key_only(&web, "apps/k", &[], 0).await.unwrap();
    h.decrypt(&web, &v1, &[], "").await.unwrap();
    // ReEncrypt decrypts under the blob's version and encrypts under the destination's.
    h.re_encrypt(&web, re_encrypt_request(&v1, &[], "", "apps/spare", &[])).await.unwrap();
    assert_eq!(
        uses(0),
        [
            at(K, 1, UseKind::Encrypt),
            at(K, 1, UseKind::Encrypt),
            at(K, 1, UseKind::Encrypt),
            at(K, 1, UseKind::Decrypt),
            at(K, 1, UseKind::Decrypt),
            at(SPARE, 1, UseKind::Encrypt),
        ]
    );
    // A failed decryption (a tampered blob) used nothing; neither did DescribeKey.
    let mut tampered = v1.clone();
    *tampered.last_mut().unwrap() ^= 1;
    h.decrypt(&web, &tampered, &[], "").await.unwrap_err();
    h.describe(&web, "apps/k").await.unwrap();
    assert_eq!(h.uses.uses().len(), 6);

    // Version 2 current, version 1 pending destruction: decrypting under 1 is a refused use
    // of 1, for the authorized caller only.
    h.change_key("apps", "k", |k| {
        k.info.current_version = Some(2);
        k.info.refused_versions.insert(1, VersionRefusal::PendingDestruction);
    });
    refused(
        h.decrypt(&web, &v1, &[], "").await,
        Code::FailedPrecondition,
        "version 1 of key apps/k is PendingDestruction; it refuses to decrypt",
    );
    h.re_encrypt(&web, re_encrypt_request(&v1, &[], "", "apps/spare", &[])).await.unwrap_err();
    h.decrypt(&intruder, &v1, &[], "").await.unwrap_err();
    assert_eq!(uses(6), [at(K, 1, UseKind::Refused), at(K, 1, UseKind::Refused)]);
    // Only disabled, version 1's refusal postpones nothing.
    h.change_key("apps", "k", |k| {
        k.info.refused_versions.insert(1, VersionRefusal::Disabled);
    });
    h.decrypt(&web, &v1, &[], "").await.unwrap_err();
    assert_eq!(h.uses.uses().len(), 8);

    // The key pending deletion: a refused encryption under the current version, a refused
    // decryption under the blob's; a ReEncrypt into it decrypted its source first. Nothing
    // for a caller without the right, who must not be able to postpone a destruction.
    let v2 = h.encrypt(&web, "apps/k", b"two", &[]).await.unwrap().ciphertext_blob;
    let spare_blob = h.encrypt(&web, "apps/spare", b"spare", &[]).await.unwrap().ciphertext_blob;
    let n = h.uses.uses().len();
    h.change_key("apps", "k", |k| k.info.state = KeyState::PendingDeletion);
    h.encrypt(&web, "apps/k", b"x", &[]).await.unwrap_err();
    h.decrypt(&web, &v2, &[], "").await.unwrap_err();
    h.data_key(&web, "apps/k", &[], 0).await.unwrap_err();
    h.re_encrypt(&web, re_encrypt_request(&spare_blob, &[], "", "apps/k", &[])).await.unwrap_err();
    h.encrypt(&intruder, "apps/k", b"x", &[]).await.unwrap_err();
    h.decrypt(&intruder, &v2, &[], "").await.unwrap_err();
    h.data_key_only(&intruder, "apps/k", &[], 0).await.unwrap_err();
    assert_eq!(
        uses(n),
        [
            at(K, 2, UseKind::Refused),
            at(K, 2, UseKind::Refused),
            at(K, 2, UseKind::Refused),
            at(SPARE, 1, UseKind::Decrypt),
            at(K, 2, UseKind::Refused),
        ]
    );
    // Disabled, the key's refusals postpone nothing.
    h.change_key("apps", "k", |k| k.info.state = KeyState::Disabled);
    h.decrypt(&web, &v2, &[], "").await.unwrap_err();
    assert_eq!(h.uses.uses().len(), n + 5);
    h.stop().await;
}
