//! Auth: the peer's key is its identity, grants give it roles, rules say who may do what.
//!
//! - **Identity.** Every connection is authenticated by the peer's ed25519 key (TLS or Noise),
//!   so every call, message and record already names a peer that cannot be forged. The same
//!   identity exports as an X.509 [`Certificate`] for TLS software outside the mesh.
//! - **Grants.** An issuer (any ed25519 identity the nodes [trust](Config::trust)) signs a
//!   [`Grant`]: subject peer, roles, not-before, expiry, network. A grant is worth something only
//!   to its subject: a node counts the roles of a grant only for the peer the grant names.
//!   Issuers take grants back with a signed [`Revocation`], which spreads to every node (each
//!   node passes new revocations to its peers, and exchanges what it knows with every peer it
//!   connects to); a grant's expiry bounds the rest.
//! - **Rules.** [`Rule`]s (resource pattern, subject, allow or deny, priority) are evaluated by
//!   priority with deny winning ties; when none matches, the [`DefaultPolicy`] decides: any
//!   authenticated peer (the default), or nobody.
//!
//! **Enforcement.** Each node checks every request against its own rules before anything
//! happens:
//!
//! | Operation | Resources checked | Where | Refused with |
//! |---|---|---|---|
//! | RPC call, unary or stream | `service:S`, `endpoint:S/E` | the serving node, before the handler runs | 401 (a grant presented was invalid) or 403 |
//! | broker publish | `topic:T` | the publisher, and every node receiving the message (gossip validation; never forwarded) and every queue-group member | [`broker::Error::Forbidden`](crate::broker::Error) |
//! | store write or delete | `table:D/T` | the writer, and every replica (the record is not held) | [`store::Error::Forbidden`](crate::store::Error) |
//! | setting a path of the mesh's configuration | `config:P` | the writer, every replica of the record and every node receiving the change | [`config::Error::Forbidden`](crate::config::Error) (403) |
//! | offering a service in the registry | `announce:S` | every node hearing the announcement (the service is left out of its view: callers never pick that peer for `S`) | a warning on the announcing node |
//!
//! A caller's grants reach a server through the auth exchange (`/micromesh/<network>/auth/1.0.0`,
//! once per connection, when a rule needs them); a publisher's ride in each message, a
//! writer's in each record and an announcer's in each announcement, so any node can check
//! them without asking anyone.
//!
//! **What rules cannot enforce.** Who may *read*: a gossip topic's messages reach whoever
//! subscribes to it, and a store record can be fetched by any peer of the network from the
//! peers holding it. The mesh's own protocols (Kademlia routing, registry leaves and
//! suspicions, queue-group membership) are open to every peer of the network. To close the mesh itself, give every node a pre-shared
//! network key ([`node::Builder::pre_shared_key`](crate::node::Builder::pre_shared_key)):
//! without the key no connection forms, so nobody outside can read or join anything (TCP only:
//! QUIC carries no pre-shared key). Rules should be the same on every node; a node only
//! enforces its own.
//!
//! ```
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use micromesh::{Identity, Service, Status, Context, client::CallOptions, node::Preset};
//! use micromesh::auth::{self, Grant, Rule};
//!
//! let issuer = Identity::generate();
//! let policy = auth::Config::new()
//!     .trust(issuer.peer_id())
//!     .rule("deny endpoint:admin/* any 0".parse()?)
//!     .rule("allow endpoint:admin/* role:operator 10".parse()?);
//!
//! let server = Service::builder("admin")
//!     .preset(Preset::Local)
//!     .auth(policy.clone())
//!     .handle("Admin.Whoami", |ctx: Context, _: ()| async move { Ok::<_, Status>(ctx.roles().to_vec()) })
//!     .build()
//!     .await?;
//!
//! // An operator: its grant names it, signed by the trusted issuer.
//! let operator = Identity::generate();
//! let grant = Grant::builder(operator.peer_id())
//!     .role("operator")
//!     .valid_for(Duration::from_secs(3600))
//!     .sign(&issuer, server.node().network())?;
//! let client = Service::builder("ops")
//!     .preset(Preset::Local)
//!     .identity(operator)
//!     .auth(policy.clone().grant(grant))
//!     .bootstrap(server.node().listen_addrs().await?[0].clone())
//!     .build()
//!     .await?;
//! // Calls pinned to the server's peer: no wait for the registry in this example.
//! let to_server = || CallOptions::default().peer(server.peer_id());
//! let roles: Vec<String> =
//!     client.client().call_with("admin", "Admin.Whoami", &(), to_server()).await?;
//! assert_eq!(roles, ["operator"]);
//!
//! // Anyone else gets 403 before the handler runs.
//! let stranger = Service::builder("stranger")
//!     .preset(Preset::Local)
//!     .auth(policy)
//!     .bootstrap(server.node().listen_addrs().await?[0].clone())
//!     .build()
//!     .await?;
//! let refused = stranger
//!     .client()
//!     .call_with::<_, Vec<String>>("admin", "Admin.Whoami", &(), to_server())
//!     .await;
//! assert_eq!(refused.unwrap_err().status().code().as_u16(), 403);
//! # for s in [stranger, client, server] { s.stop().await?; }
//! # Ok(()) }
//! ```

pub mod certificate;
pub(crate) mod exchange;
mod grant;
mod rules;

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime},
};

use futures::future::BoxFuture;
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde_bytes::ByteBuf;
use sha2::{Digest as _, Sha256};

use self::rules::RuleSet;
pub use self::{
    certificate::{Certificate, Error as CertificateError, client_config, peer_of, server_config},
    grant::{
        Error as GrantError, Grant, GrantBuilder, GrantId, MAX_GRANT, MAX_REVOCATION, MAX_ROLES,
        Revocation, SIGNING_CONTEXT,
    },
    rules::{Effect, Kind, Resource, Rule, RuleError, Subject},
};
use crate::{PeerId, Status};

/// How far ahead of this node's clock a grant's start may be and still count (clock skew).
pub const CLOCK_SKEW: Duration = Duration::from_secs(300);
/// The most revocations a node keeps (the oldest-expiring beyond this are dropped).
pub const MAX_REVOCATIONS: usize = 4096;
/// The most grants one peer presents, or one message or record carries.
pub const MAX_PRESENTED: usize = 16;
/// How many distinct grants a node remembers as verified.
const VERIFIED_CACHE: usize = 4096;

/// What happens when no rule matches a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DefaultPolicy {
    /// Any authenticated peer of the network may (go-micro's default, and micromesh's).
    #[default]
    AllowAuthenticated,
    /// Nobody may: every operation needs a rule that allows it, offering a service in the
    /// registry included (`allow announce:* any` lets every peer offer services).
    Deny,
}

/// Errors of the auth component.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A grant given to this node names another peer: it would be worth nothing.
    #[error("grant {grant} is for peer {subject}, not for this node ({this})")]
    NotSubject {
        /// The grant.
        grant: GrantId,
        /// The peer it names.
        subject: Box<PeerId>,
        /// This node.
        this: Box<PeerId>,
    },
    /// A grant or revocation is not acceptable here.
    #[error("{0}")]
    Refused(Rejection),
    /// This node holds [`MAX_PRESENTED`] grants already.
    #[error("a node presents at most {MAX_PRESENTED} grants")]
    TooManyGrants,
}

/// Why a grant gives no roles, or a revocation is not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// The bytes are not a valid signed grant.
    #[error("{0}")]
    Invalid(GrantError),
    /// The issuer is not one this node trusts.
    #[error("issuer {0} is not trusted here")]
    UntrustedIssuer(Box<PeerId>),
    /// The grant is for another network.
    #[error("it is for network {0:?}")]
    WrongNetwork(String),
    /// The grant names another peer than the one presenting it.
    #[error("it is for peer {subject}, presented by {presenter}")]
    NotSubject {
        /// The peer the grant names.
        subject: Box<PeerId>,
        /// The peer that presented it.
        presenter: Box<PeerId>,
    },
    /// The grant's window has not started.
    #[error("it is not valid before {0:?}")]
    NotYetValid(SystemTime),
    /// The grant has expired.
    #[error("it expired at {0:?}")]
    Expired(SystemTime),
    /// The issuer revoked the grant.
    #[error("its issuer revoked it")]
    Revoked,
}

/// A request refused by the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// 401 when a grant the peer presented was refused (its credentials are at fault), else 403.
    pub code: u16,
    /// Why, for the peer and the logs.
    pub reason: String,
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl Denied {
    /// The status a caller gets.
    pub fn status(&self) -> Status {
        if self.code == 401 {
            Status::unauthorized(self.reason.clone()).with_id("micromesh.auth")
        } else {
            Status::forbidden(self.reason.clone()).with_id("micromesh.auth")
        }
    }
}

/// The auth configuration of a node: trusted issuers, rules, the default policy, and the
/// node's own grants.
///
/// ```
/// use micromesh::{Identity, auth::{Config, DefaultPolicy}};
///
/// let issuer = Identity::generate();
/// let config = Config::new()
///     .default_policy(DefaultPolicy::Deny)
///     .trust(issuer.peer_id())
///     .rule("allow service:greeter any".parse()?);
/// assert_eq!(config.rules().len(), 1);
/// # Ok::<(), micromesh::auth::RuleError>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct Config {
    default: DefaultPolicy,
    issuers: HashSet<PeerId>,
    rules: Vec<Rule>,
    grants: Vec<Grant>,
}

impl Config {
    /// No rules, no trusted issuers, any authenticated peer allowed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the default policy.
    pub fn default_policy(mut self, policy: DefaultPolicy) -> Self {
        self.default = policy;
        self
    }

    /// Trusts grants and revocations signed by `issuer` (an ed25519 peer id).
    pub fn trust(mut self, issuer: PeerId) -> Self {
        self.issuers.insert(issuer);
        self
    }

    /// Adds a rule.
    pub fn rule(mut self, rule: Rule) -> Self {
        self.rules.push(rule);
        self
    }

    /// Adds rules.
    pub fn rules_from(mut self, rules: impl IntoIterator<Item = Rule>) -> Self {
        self.rules.extend(rules);
        self
    }

    /// Adds a grant this node presents. Its subject must be the node (checked when the node
    /// starts).
    pub fn grant(mut self, grant: Grant) -> Self {
        self.grants.push(grant);
        self
    }

    /// The rules.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The default policy.
    pub fn policy(&self) -> DefaultPolicy {
        self.default
    }

    /// The trusted issuers.
    pub fn issuers(&self) -> impl Iterator<Item = &PeerId> {
        self.issuers.iter()
    }
}

struct Policy {
    default: DefaultPolicy,
    issuers: HashSet<PeerId>,
    rules: RuleSet,
}

/// What a peer asked to do, for the metrics of denials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Surface {
    /// An RPC call (unary or stream).
    Call,
    /// A broker message (gossip or queue-group delivery).
    Publish,
    /// A store record or index entry.
    Write,
    /// A service offered in a registry announcement.
    Announce,
}

impl Surface {
    fn label(self) -> &'static str {
        match self {
            Self::Call => "call",
            Self::Publish => "publish",
            Self::Write => "write",
            Self::Announce => "announce",
        }
    }
}

type Labels = [(&'static str, &'static str); 1];

/// The auth component's metrics (prefix `micromesh_auth_`).
#[derive(Clone, Default)]
struct Metrics {
    denied: Family<Labels, Counter>,
    grants_refused: Counter,
    revocations: Gauge,
}

/// Where a peer's grants come from when it is checked.
pub(crate) enum Grants<'a> {
    /// Grants carried by the message, record or announcement (encoded).
    Carried(&'a [ByteBuf]),
    /// What a peer presented in the auth exchange (or this node's own grants).
    Presented(&'a Presentation),
}

/// The grants a peer presented, decoded, and why any of them did not decode.
#[derive(Clone, Debug, Default)]
pub(crate) struct Presentation {
    pub(crate) grants: Vec<Arc<Grant>>,
    pub(crate) refused: Option<String>,
}

#[derive(Default)]
struct Revocations {
    by_grant: HashMap<GrantId, Revocation>,
}

impl Revocations {
    fn is_revoked(&self, grant: &Grant) -> bool {
        self.by_grant
            .get(&grant.id())
            .is_some_and(|r| r.issuer_key() == grant.issuer_key())
    }

    /// A digest of the set, to tell whether two nodes know the same revocations.
    fn digest(&self) -> [u8; 32] {
        let mut ids: Vec<&GrantId> = self.by_grant.keys().collect();
        ids.sort();
        let mut hasher = Sha256::new();
        for id in ids {
            hasher.update(id.0);
        }
        hasher.finalize().into()
    }
}

/// The decoding verdict of one grant.
type Verdict = Result<Arc<Grant>, GrantError>;
/// The grants a peer presented, filled once by an exchange.
type Presented = tokio::sync::OnceCell<Arc<Presentation>>;

struct Inner {
    this: PeerId,
    network: String,
    policy: RwLock<Policy>,
    own: RwLock<Vec<Arc<Grant>>>,
    revocations: RwLock<Revocations>,
    /// Decoding verdicts by SHA-256 of the grant's bytes.
    verified: Mutex<HashMap<[u8; 32], Verdict>>,
    /// What each connected peer presented, or is being asked for.
    presented: Mutex<HashMap<PeerId, Arc<Presented>>>,
    /// The protocol that talks to peers, once a node's exchange is attached
    /// ([`Auth::attach`]); without one, this node asks nobody and tells nobody.
    exchanger: std::sync::OnceLock<Arc<dyn Exchanger>>,
    metrics: Metrics,
}

/// What the policy needs from the auth exchange, which talks to peers over the node (the
/// exchange sits above the node; the policy below it, so it cannot name the exchange).
pub(crate) trait Exchanger: Send + Sync + 'static {
    /// Asks `peer` for the grants it presents.
    fn ask(
        &self,
        auth: &Auth,
        peer: PeerId,
    ) -> BoxFuture<'static, Result<Arc<Presentation>, String>>;
    /// Hands `revocation` to every connected peer; resolves to how many hold it now.
    fn spread(&self, auth: &Auth, revocation: Revocation) -> BoxFuture<'static, usize>;
    /// Tells every connected peer this node's grants (they changed).
    fn push_all(&self, auth: &Auth);
}

/// A node's auth component: its policy, its grants, the revocations it knows, and what peers
/// presented. Cheap to clone. Every node has one ([`Node::auth`](crate::node::Node::auth)).
#[derive(Clone)]
pub struct Auth {
    inner: Arc<Inner>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("this", &self.inner.this)
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// The policy of node `this` on `network`; it talks to peers once an exchange is
    /// attached ([`Auth::attach`]).
    pub(crate) fn new(this: PeerId, network: String, config: Config) -> Result<Self, Error> {
        let auth = Self {
            inner: Arc::new(Inner {
                this,
                network,
                policy: RwLock::new(Policy {
                    default: config.default,
                    issuers: config.issuers,
                    rules: RuleSet::new(config.rules),
                }),
                own: RwLock::new(Vec::new()),
                revocations: RwLock::new(Revocations::default()),
                verified: Mutex::new(HashMap::new()),
                presented: Mutex::new(HashMap::new()),
                exchanger: std::sync::OnceLock::new(),
                metrics: Metrics::default(),
            }),
        };
        for grant in config.grants {
            auth.add_own(grant)?;
        }
        let policy = auth.policy();
        if !policy.rules.rules().is_empty()
            || !policy.issuers.is_empty()
            || policy.default != DefaultPolicy::AllowAuthenticated
        {
            tracing::info!(
                rules = policy.rules.rules().len(),
                trusted_issuers = policy.issuers.len(),
                default = ?policy.default,
                "auth rules in force"
            );
        }
        drop(policy);
        if !auth.own().is_empty() {
            tracing::info!(grants = auth.own().len(), roles = ?auth.roles(), "presenting grants");
        }
        Ok(auth)
    }

    /// Registers the auth metrics: denials by what was asked (`call`, `publish`, `write`),
    /// grants refused, revocations held.
    pub(crate) fn register_metrics(&self, registry: &mut Registry) {
        let metrics = &self.inner.metrics;
        registry.register(
            "denied",
            "Requests from peers refused by the auth rules, by what was asked",
            metrics.denied.clone(),
        );
        registry.register(
            "grants_refused",
            "Grants presented or carried that gave no roles (forged, expired, revoked, untrusted issuer, another subject)",
            metrics.grants_refused.clone(),
        );
        registry.register(
            "revocations",
            "Revocations this node holds",
            metrics.revocations.clone(),
        );
    }

    /// An auth component without a node, for unit tests.
    #[cfg(test)]
    pub(crate) fn detached(this: PeerId, network: &str, config: Config) -> Self {
        Self::new(this, network.to_owned(), config).expect("a valid test configuration")
    }

    /// Attaches the protocol that talks to peers. Once only: a second one is ignored.
    pub(crate) fn attach(&self, exchanger: Arc<dyn Exchanger>) {
        if self.inner.exchanger.set(exchanger).is_err() {
            tracing::debug!("an auth exchange is attached already");
        }
    }

    fn exchanger(&self) -> Option<&Arc<dyn Exchanger>> {
        self.inner.exchanger.get()
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.inner.this
    }

    /// The rules, highest priority first.
    pub fn rules(&self) -> Vec<Rule> {
        self.policy().rules.rules().to_vec()
    }

    /// Replaces the rules; the next request is checked against the new ones.
    pub fn set_rules(&self, rules: Vec<Rule>) {
        self.inner
            .policy
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .rules = RuleSet::new(rules);
    }

    /// The default policy.
    pub fn default_policy(&self) -> DefaultPolicy {
        self.policy().default
    }

    /// Sets the default policy.
    pub fn set_default_policy(&self, policy: DefaultPolicy) {
        self.inner
            .policy
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .default = policy;
    }

    /// Trusts one more issuer.
    pub fn trust(&self, issuer: PeerId) {
        self.inner
            .policy
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .issuers
            .insert(issuer);
    }

    /// The grants this node presents.
    pub fn grants(&self) -> Vec<Grant> {
        self.own().iter().map(|g| (**g).clone()).collect()
    }

    /// The roles this node holds now through its valid grants.
    pub fn roles(&self) -> Vec<String> {
        let own = self.own();
        self.roles_from(self.inner.this, &own, SystemTime::now()).0
    }

    /// Presents one more grant (for example a renewed one) and tells every connected peer.
    ///
    /// # Errors
    ///
    /// [`Error::NotSubject`] if the grant names another peer, [`Error::TooManyGrants`] beyond
    /// [`MAX_PRESENTED`]. A grant from an issuer this node does not trust is kept (other nodes
    /// may trust it) and logged.
    pub fn add_grant(&self, grant: Grant) -> Result<(), Error> {
        self.add_own(grant)?;
        if let Some(exchanger) = self.exchanger() {
            exchanger.push_all(self);
        }
        Ok(())
    }

    /// Presents `grant` whatever peer it names, and tells every connected peer (fault injection:
    /// a peer replaying another's grant).
    #[cfg(feature = "testing")]
    pub(crate) fn present_unchecked(&self, grant: Grant) {
        self.inner
            .own
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(grant));
        if let Some(exchanger) = self.exchanger() {
            exchanger.push_all(self);
        }
    }

    fn add_own(&self, grant: Grant) -> Result<(), Error> {
        if grant.subject() != self.inner.this {
            return Err(Error::NotSubject {
                grant: grant.id(),
                subject: Box::new(grant.subject()),
                this: Box::new(self.inner.this),
            });
        }
        match self.check_grant(&grant, self.inner.this, SystemTime::now()) {
            Ok(()) => {}
            // A node that trusts no issuer enforces nothing with roles (a client presenting its
            // grant to the servers that do): its own view of the grant does not matter.
            Err(Rejection::UntrustedIssuer(_)) if self.policy().issuers.is_empty() => {}
            Err(reason) => {
                tracing::warn!(grant = %grant.id(), "this node's own grant gives it no roles here: {reason}");
            }
        }
        let mut own = self.inner.own.write().unwrap_or_else(|e| e.into_inner());
        own.retain(|g| g.id() != grant.id());
        if own.len() >= MAX_PRESENTED {
            return Err(Error::TooManyGrants);
        }
        own.push(Arc::new(grant));
        Ok(())
    }

    /// Takes a revocation: from now on this node refuses the grant. Then hands it to every
    /// connected peer, which pass it on to theirs, and waits for their answers (at most 10 s).
    /// Returns how many connected peers hold it now.
    ///
    /// # Errors
    ///
    /// [`Error::Refused`] if the issuer is not trusted here or the revocation is for another
    /// network.
    pub async fn revoke(&self, revocation: Revocation) -> Result<usize, Error> {
        self.learn_revocation(revocation.clone())?;
        Ok(match self.exchanger() {
            Some(exchanger) => exchanger.spread(self, revocation).await,
            None => 0,
        })
    }

    /// Whether this node knows that `grant` is revoked.
    pub fn is_revoked(&self, grant: &Grant) -> bool {
        self.inner
            .revocations
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_revoked(grant)
    }

    /// The revocations this node knows.
    pub fn revocations(&self) -> Vec<Revocation> {
        self.inner
            .revocations
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_grant
            .values()
            .cloned()
            .collect()
    }

    /// Checks whether `grant` gives roles to `presenter` at `at`: well signed, by a trusted
    /// issuer, for this network and for `presenter`, inside its window, not revoked.
    ///
    /// # Errors
    ///
    /// The [`Rejection`].
    pub fn check_grant(
        &self,
        grant: &Grant,
        presenter: PeerId,
        at: SystemTime,
    ) -> Result<(), Rejection> {
        if grant.network() != self.inner.network {
            return Err(Rejection::WrongNetwork(grant.network().to_owned()));
        }
        if !self.policy().issuers.contains(&grant.issuer()) {
            return Err(Rejection::UntrustedIssuer(Box::new(grant.issuer())));
        }
        if grant.subject() != presenter {
            return Err(Rejection::NotSubject {
                subject: Box::new(grant.subject()),
                presenter: Box::new(presenter),
            });
        }
        if at + CLOCK_SKEW < grant.not_before() {
            return Err(Rejection::NotYetValid(grant.not_before()));
        }
        if at >= grant.expires() {
            return Err(Rejection::Expired(grant.expires()));
        }
        if self.is_revoked(grant) {
            return Err(Rejection::Revoked);
        }
        Ok(())
    }

    fn policy(&self) -> std::sync::RwLockReadGuard<'_, Policy> {
        self.inner.policy.read().unwrap_or_else(|e| e.into_inner())
    }

    fn own(&self) -> Vec<Arc<Grant>> {
        self.inner
            .own
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The encoded grants this node attaches to what it publishes, writes and announces.
    pub(crate) fn own_encoded(&self) -> Vec<ByteBuf> {
        self.own()
            .iter()
            .map(|g| ByteBuf::from(g.to_bytes().to_vec()))
            .collect()
    }

    /// Decodes a grant, once per distinct grant: the verdict is cached.
    fn decode_cached(&self, bytes: &[u8]) -> Result<Arc<Grant>, GrantError> {
        let key: [u8; 32] = Sha256::digest(bytes).into();
        let mut verified = self
            .inner
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(result) = verified.get(&key) {
            return result.clone();
        }
        let result = Grant::decode(bytes).map(Arc::new);
        if verified.len() >= VERIFIED_CACHE {
            verified.clear();
        }
        verified.insert(key, result.clone());
        result
    }

    /// The roles `peer` holds at `at` through `grants`, and the first reason a grant was refused.
    fn roles_from(
        &self,
        peer: PeerId,
        grants: &[Arc<Grant>],
        at: SystemTime,
    ) -> (Vec<String>, Option<String>) {
        let mut roles: Vec<String> = Vec::new();
        let mut refused = None;
        for grant in grants.iter().take(MAX_PRESENTED) {
            match self.check_grant(grant, peer, at) {
                Ok(()) => {
                    for role in grant.roles() {
                        if !roles.contains(role) {
                            roles.push(role.clone());
                        }
                    }
                }
                Err(reason) => {
                    refused
                        .get_or_insert_with(|| format!("grant {} refused: {reason}", grant.id()));
                }
            }
        }
        (roles, refused)
    }

    fn decode_all(&self, carried: &[ByteBuf]) -> Presentation {
        let mut grants = Vec::with_capacity(carried.len());
        let mut refused = None;
        for bytes in carried.iter().take(MAX_PRESENTED) {
            match self.decode_cached(bytes) {
                Ok(grant) => grants.push(grant),
                Err(e) => {
                    refused.get_or_insert_with(|| format!("a grant was refused: {e}"));
                }
            }
        }
        Presentation { grants, refused }
    }

    /// Whether the rules about `resources` look at roles, or handlers want them: only then
    /// does a server ask a caller for its grants.
    pub(crate) fn wants_roles(&self, resources: &[Resource]) -> bool {
        let policy = self.policy();
        !policy.issuers.is_empty() || policy.rules.needs_roles(resources)
    }

    /// Decides whether `peer`, holding `grants`, may act on `resources` at `at`. Returns its
    /// roles when allowed; counts a denial under `surface`.
    pub(crate) fn authorize(
        &self,
        surface: Surface,
        peer: PeerId,
        grants: Grants<'_>,
        resources: &[Resource],
        at: SystemTime,
    ) -> Result<Vec<String>, Denied> {
        let (decision, refused) = self.decide(peer, grants, resources, at);
        if refused {
            self.inner.metrics.grants_refused.inc();
        }
        if decision.is_err() {
            self.inner
                .metrics
                .denied
                .get_or_create(&[("surface", surface.label())])
                .inc();
        }
        decision
    }

    /// The decision, and whether any grant was refused.
    fn decide(
        &self,
        peer: PeerId,
        grants: Grants<'_>,
        resources: &[Resource],
        at: SystemTime,
    ) -> (Result<Vec<String>, Denied>, bool) {
        // Carried grants are decoded only when a rule about the resources names a role: on the
        // hot paths (every gossip message, every record) they are otherwise skipped unread.
        let needs_roles = self.policy().rules.needs_roles(resources);
        let carried;
        let presentation = match grants {
            Grants::Carried(bytes) if needs_roles && !bytes.is_empty() => {
                carried = self.decode_all(bytes);
                &carried
            }
            Grants::Carried(_) => {
                carried = Presentation::default();
                &carried
            }
            Grants::Presented(presentation) => presentation,
        };
        let (roles, refused_grant) = self.roles_from(peer, &presentation.grants, at);
        let refused = presentation.refused.clone().or(refused_grant);
        let policy = self.policy();
        let what = resources
            .last()
            .map_or_else(String::new, ToString::to_string);
        let denied = |reason: String| {
            Err(match &refused {
                Some(grant) => Denied {
                    code: 401,
                    reason: format!("{reason}; {grant}"),
                },
                None => Denied { code: 403, reason },
            })
        };
        let decision = match policy.rules.decide(&peer, &roles, resources) {
            Some(rule) if rule.effect == Effect::Allow => Ok(roles),
            Some(rule) => denied(format!(
                "peer {peer} may not use {what}: denied by rule `{rule}`"
            )),
            None if policy.default == DefaultPolicy::AllowAuthenticated => Ok(roles),
            None => denied(format!(
                "peer {peer} may not use {what}: no rule allows it and the default policy denies"
            )),
        };
        (decision, refused.is_some())
    }

    /// As [`Auth::authorize`] for this node itself, with its own grants.
    pub(crate) fn authorize_self(&self, resources: &[Resource]) -> Result<Vec<String>, Denied> {
        let own = Presentation {
            grants: self.own(),
            refused: None,
        };
        self.decide(
            self.inner.this,
            Grants::Presented(&own),
            resources,
            SystemTime::now(),
        )
        .0
    }

    /// Decides a request from a connected `peer` on `resources`, asking the peer for its grants
    /// (once per connection) when the rules need them.
    pub(crate) async fn authorize_peer(
        &self,
        peer: PeerId,
        resources: &[Resource],
    ) -> Result<Vec<String>, Denied> {
        let presentation = if self.wants_roles(resources) {
            self.presented(peer).await
        } else {
            Arc::default()
        };
        self.authorize(
            Surface::Call,
            peer,
            Grants::Presented(&presentation),
            resources,
            SystemTime::now(),
        )
    }

    /// The grants `peer` presented, asking it when it has not yet.
    async fn presented(&self, peer: PeerId) -> Arc<Presentation> {
        let cell = self
            .inner
            .presented
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(peer)
            .or_default()
            .clone();
        let result = cell
            .get_or_try_init(|| async {
                match self.exchanger() {
                    Some(exchanger) => exchanger.ask(self, peer).await,
                    None => Err("no auth exchange runs on this node".to_owned()),
                }
            })
            .await;
        match result {
            Ok(presentation) => presentation.clone(),
            Err(e) => {
                tracing::debug!(%peer, "asking the peer for its grants failed: {e}");
                Arc::default()
            }
        }
    }

    /// Records what `peer` presented (decoding and verifying each grant once).
    pub(crate) fn record_presented(&self, peer: PeerId, carried: &[ByteBuf]) -> Arc<Presentation> {
        let presentation = Arc::new(self.decode_all(carried));
        if let Some(reason) = &presentation.refused {
            tracing::debug!(%peer, "{reason}");
        }
        let cell = tokio::sync::OnceCell::new_with(Some(presentation.clone()));
        self.inner
            .presented
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer, Arc::new(cell));
        presentation
    }

    /// Forgets what `peer` presented (it disconnected).
    pub(crate) fn forget(&self, peer: &PeerId) {
        self.inner
            .presented
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(peer);
    }

    /// Takes a revocation if it is new, trusted and for this network. Returns whether it was
    /// new.
    pub(crate) fn learn_revocation(&self, revocation: Revocation) -> Result<bool, Error> {
        if revocation.network() != self.inner.network {
            return Err(Error::Refused(Rejection::WrongNetwork(
                revocation.network().to_owned(),
            )));
        }
        if !self.policy().issuers.contains(&revocation.issuer()) {
            return Err(Error::Refused(Rejection::UntrustedIssuer(Box::new(
                revocation.issuer(),
            ))));
        }
        let now = SystemTime::now();
        let mut set = self
            .inner
            .revocations
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if set.by_grant.contains_key(&revocation.grant_id()) {
            return Ok(false);
        }
        if revocation.until() <= now {
            // The grant has expired anyway.
            return Ok(false);
        }
        if set.by_grant.len() >= MAX_REVOCATIONS {
            set.by_grant.retain(|_, r| r.until() > now);
        }
        if set.by_grant.len() >= MAX_REVOCATIONS {
            // Drop the one whose grant expires first: it matters for the shortest time.
            let first = set
                .by_grant
                .values()
                .min_by_key(|r| r.until())
                .map(Revocation::grant_id);
            if let Some(first) = first {
                set.by_grant.remove(&first);
            }
        }
        tracing::info!(grant = %revocation.grant_id(), issuer = %revocation.issuer(), "grant revoked");
        set.by_grant.insert(revocation.grant_id(), revocation);
        self.inner
            .metrics
            .revocations
            .set(i64::try_from(set.by_grant.len()).unwrap_or(i64::MAX));
        Ok(true)
    }

    fn revocation_digest(&self) -> [u8; 32] {
        self.inner
            .revocations
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .digest()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;

    fn setup() -> (Auth, Identity, Identity) {
        let issuer = Identity::generate();
        let server = Identity::generate();
        let config = Config::new()
            .trust(issuer.peer_id())
            .rule("deny topic:t any 0".parse().unwrap())
            .rule("allow topic:t role:r 10".parse().unwrap());
        (
            Auth::detached(server.peer_id(), "net", config),
            issuer,
            Identity::generate(),
        )
    }

    fn check(auth: &Auth, peer: PeerId, carried: &[Vec<u8>]) -> Result<Vec<String>, u16> {
        check_on(auth, peer, carried, "t")
    }

    fn check_on(
        auth: &Auth,
        peer: PeerId,
        carried: &[Vec<u8>],
        topic: &str,
    ) -> Result<Vec<String>, u16> {
        let carried: Vec<ByteBuf> = carried.iter().cloned().map(ByteBuf::from).collect();
        auth.authorize(
            Surface::Publish,
            peer,
            Grants::Carried(&carried),
            &[Resource::topic(topic)],
            SystemTime::now(),
        )
        .map_err(|d| d.code)
    }

    #[test]
    fn credentials_at_fault_get_401_and_missing_ones_403() {
        let (auth, issuer, peer) = setup();
        let grant = Grant::builder(peer.peer_id())
            .role("r")
            .sign(&issuer, "net")
            .unwrap();
        let good = grant.to_bytes().to_vec();
        assert_eq!(
            check(&auth, peer.peer_id(), std::slice::from_ref(&good)),
            Ok(vec!["r".to_owned()])
        );
        assert_eq!(check(&auth, peer.peer_id(), &[]), Err(403));
        // Where no rule names a role, carried grants are not even read.
        assert_eq!(
            check_on(&auth, peer.peer_id(), &[b"garbage".to_vec()], "other"),
            Ok(vec![])
        );
        // A broken signature, another network, an untrusted issuer, another subject: 401.
        let mut broken = good.clone();
        *broken.last_mut().unwrap() ^= 1;
        let other_net = Grant::builder(peer.peer_id())
            .role("r")
            .sign(&issuer, "other")
            .unwrap();
        let untrusted = Grant::builder(peer.peer_id())
            .role("r")
            .sign(&Identity::generate(), "net")
            .unwrap();
        for bad in [
            broken,
            other_net.to_bytes().to_vec(),
            untrusted.to_bytes().to_vec(),
        ] {
            assert_eq!(check(&auth, peer.peer_id(), &[bad]), Err(401));
        }
        assert_eq!(
            check(
                &auth,
                Identity::generate().peer_id(),
                std::slice::from_ref(&good)
            ),
            Err(401)
        );
        // One good grant next to a bad one is enough.
        let mut broken = good.clone();
        broken[10] ^= 1;
        assert!(check(&auth, peer.peer_id(), &[broken, good.clone()]).is_ok());
        // Revoked: 401 from the moment the revocation is taken.
        let revocation = Revocation::of(&grant, &issuer).unwrap();
        assert_eq!(auth.learn_revocation(revocation.clone()), Ok(true));
        assert_eq!(auth.learn_revocation(revocation), Ok(false));
        assert_eq!(check(&auth, peer.peer_id(), &[good]), Err(401));
    }

    #[test]
    fn a_presentation_keeps_why_a_grant_did_not_decode() {
        let (auth, _, peer) = setup();
        let presentation =
            auth.record_presented(peer.peer_id(), &[ByteBuf::from(b"garbage".to_vec())]);
        assert!(presentation.grants.is_empty());
        let denied = auth
            .authorize(
                Surface::Call,
                peer.peer_id(),
                Grants::Presented(&presentation),
                &[Resource::topic("t")],
                SystemTime::now(),
            )
            .unwrap_err();
        assert_eq!(denied.code, 401);
        assert!(
            denied.reason.contains("malformed grant"),
            "{}",
            denied.reason
        );
    }

    #[test]
    fn revocations_are_bounded_and_drop_the_soonest_expiring() {
        let (auth, issuer, peer) = setup();
        let grants: Vec<Grant> = (0..MAX_REVOCATIONS as u64 + 1)
            .map(|i| {
                Grant::builder(peer.peer_id())
                    .role("r")
                    .valid_for(Duration::from_secs(3600 + i))
                    .sign(&issuer, "net")
                    .unwrap()
            })
            .collect();
        for grant in &grants {
            let revocation = Revocation::of(grant, &issuer).unwrap();
            assert_eq!(auth.learn_revocation(revocation), Ok(true));
        }
        assert_eq!(auth.revocations().len(), MAX_REVOCATIONS);
        assert!(
            !auth.is_revoked(&grants[0]),
            "the soonest-expiring was dropped"
        );
        assert!(auth.is_revoked(&grants[MAX_REVOCATIONS]));
    }

    #[test]
    fn a_node_refuses_to_present_another_peers_grant() {
        let (auth, issuer, peer) = setup();
        let grant = Grant::builder(peer.peer_id())
            .role("r")
            .sign(&issuer, "net")
            .unwrap();
        assert!(matches!(
            auth.add_grant(grant),
            Err(Error::NotSubject { .. })
        ));
        assert!(auth.grants().is_empty());
    }
}
