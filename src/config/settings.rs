//! The options of a service and its node, as a configuration holds them.

use std::{path::PathBuf, time::Duration};

use futures::StreamExt as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{Config, Error};
use crate::{
    Multiaddr, PeerId,
    auth::{Auth, DefaultPolicy, Rule},
};

/// The paths whose environment values are comma-separated lists.
pub(super) const LIST_KEYS: &[&str] = &[
    "listen",
    "bootstrap",
    "advertise",
    "auth.trust",
    "auth.rules",
];

/// The options [`Service::builder`](crate::Service::builder)`.config(…)` reads from a
/// [`Config`]: every key is optional, and a key that is not set leaves the builder's value.
///
/// ```toml
/// network = "shop"
/// data_dir = "/var/lib/shop"
/// listen = ["/ip4/0.0.0.0/udp/4001/quic-v1", "/ip4/0.0.0.0/tcp/4001"]
/// bootstrap = ["/dns4/seed.example/udp/4001/quic-v1/p2p/12D3KooW…"]
/// advertise = []                  # addresses peers reach this node at
/// max_connections = 200
/// max_connections_per_peer = 2
/// dial_timeout = "10s"            # durations: "500ms", "10s", "2m", "1h 30m"
/// connect_timeout = "3s"
/// idle_timeout = "60s"
/// query_timeout = "30s"
///
/// [auth]                          # applied again whenever it changes, without a restart
/// default_policy = "deny"         # or "allow-authenticated"
/// trust = ["12D3KooW…"]           # grant issuers (added while running; removing needs a restart)
/// rules = ["allow service:* any", "allow announce:* any", "deny endpoint:shop/Admin.* any 10"]
/// ```
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use micromesh::config::{Config, Settings};
/// let config = Config::builder()
///     .set("network", "shop")?
///     .set("dial_timeout", "2s")?
///     .set("auth.rules", ["deny service:admin any"])?
///     .build()?;
/// let settings = Settings::from_config(&config)?;
/// assert_eq!(settings.network.as_deref(), Some("shop"));
/// assert_eq!(settings.dial_timeout, Some(std::time::Duration::from_secs(2)));
/// assert_eq!(settings.auth.rules[0].to_string(), "deny service:admin any 0");
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct Settings {
    /// The network's name.
    pub network: Option<String>,
    /// Where the node keeps its identity, records and last known mesh configuration.
    pub data_dir: Option<PathBuf>,
    /// The addresses to listen on (replacing the builder's).
    pub listen: Vec<Multiaddr>,
    /// Peers to join through (added to the builder's).
    pub bootstrap: Vec<Multiaddr>,
    /// Addresses peers reach this node at (a port forward's, for example).
    pub advertise: Vec<Multiaddr>,
    /// The most connections in all.
    pub max_connections: Option<u32>,
    /// The most connections to one peer.
    pub max_connections_per_peer: Option<u32>,
    /// How long a dial may take, all addresses together.
    #[serde(with = "duration_text")]
    pub dial_timeout: Option<Duration>,
    /// How long connecting to one address may take.
    #[serde(with = "duration_text")]
    pub connect_timeout: Option<Duration>,
    /// How long an unused connection stays open.
    #[serde(with = "duration_text")]
    pub idle_timeout: Option<Duration>,
    /// How long a DHT query may take.
    #[serde(with = "duration_text")]
    pub query_timeout: Option<Duration>,
    /// The auth policy.
    pub auth: AuthSettings,
}

/// The `auth` section of [`Settings`]: applied when the service starts, and again whenever it
/// changes in any source.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct AuthSettings {
    /// `"allow-authenticated"` or `"deny"`.
    #[serde(with = "policy_text")]
    pub default_policy: Option<DefaultPolicy>,
    /// Issuers whose grants count.
    pub trust: Vec<PeerId>,
    /// Rules, in their text form (`allow service:greeter any 0`), after the builder's.
    pub rules: Vec<Rule>,
}

impl Settings {
    /// Reads the settings from `config`, warning about misspelt keys of the `auth` section
    /// (other unknown keys are the application's).
    ///
    /// # Errors
    ///
    /// [`Error::Type`] when a value does not parse: a bad address, duration or rule.
    pub fn from_config(config: &Config) -> Result<Self, Error> {
        let (settings, unknown) = config.scan_reporting_unknown::<Self>()?;
        for path in unknown.iter().filter(|p| p.starts_with("auth.")) {
            tracing::warn!("configuration: unknown key {path:?} ignored");
        }
        Ok(settings)
    }

    /// The node builder with these settings applied.
    pub(crate) fn apply(&self, mut node: crate::node::Builder) -> crate::node::Builder {
        if let Some(network) = &self.network {
            node = node.network(network.clone());
        }
        if let Some(dir) = &self.data_dir {
            node = node.data_dir(dir.clone());
        }
        if !self.listen.is_empty() {
            node = node.no_listen();
            for addr in &self.listen {
                node = node.listen(addr.clone());
            }
        }
        for addr in &self.bootstrap {
            node = node.bootstrap(addr.clone());
        }
        for addr in &self.advertise {
            node = node.external_address(addr.clone());
        }
        if let Some(n) = self.max_connections {
            node = node.max_connections(n);
        }
        if let Some(n) = self.max_connections_per_peer {
            node = node.max_connections_per_peer(n);
        }
        if let Some(t) = self.dial_timeout {
            node = node.dial_timeout(t);
        }
        if let Some(t) = self.connect_timeout {
            node = node.connection_timeout(t);
        }
        if let Some(t) = self.idle_timeout {
            node = node.idle_timeout(t);
        }
        if let Some(t) = self.query_timeout {
            node = node.query_timeout(t);
        }
        let mut auth = node.auth_config().clone();
        if let Some(policy) = self.auth.default_policy {
            auth = auth.default_policy(policy);
        }
        for issuer in &self.auth.trust {
            auth = auth.trust(*issuer);
        }
        node.auth(auth.rules_from(self.auth.rules.iter().cloned()))
    }
}

/// Keeps `auth`'s policy following the `auth` section of `config`: the rules become `base`'s
/// followed by the section's, the default policy the section's (or `base`'s). A section that
/// does not parse keeps the policy in force, and is logged, counted and reported.
pub(crate) fn follow_auth(
    config: &Config,
    auth: Auth,
    base: crate::auth::Config,
) -> impl Future<Output = ()> + Send + 'static {
    follow(config.downgrade(), auth, base)
}

/// [`follow_auth`], holding the configuration weakly: the task does not keep it alive.
async fn follow(config: super::Weak, auth: Auth, base: crate::auth::Config) {
    // Watch first, then read: a change in between is applied twice, never missed. The first
    // read takes in what the mesh layer loaded from the data directory after the node was
    // built with the other sources' settings.
    let (mut changes, now) = match config.upgrade() {
        Some(config) => (
            config.watch::<AuthSettings>("auth"),
            config.get_opt::<AuthSettings>("auth"),
        ),
        None => return,
    };
    let mut next = Some(now.map(Option::unwrap_or_default));
    loop {
        let change = match next.take() {
            Some(change) => change,
            None => match changes.next().await {
                Some(change) => change,
                None => return,
            },
        };
        let section = match change {
            Ok(section) => section,
            // The section is gone: back to the policy given in code.
            Err(Error::Missing { .. }) => AuthSettings::default(),
            Err(Error::Type { path, reason }) if path == "auth" => {
                if let Some(config) = config.upgrade() {
                    config.inner.report(Error::Type { path, reason });
                }
                continue;
            }
            // A source's error: the sources keep their last good values, nothing changed here.
            Err(_) => continue,
        };
        let rules: Vec<Rule> = base.rules().iter().chain(&section.rules).cloned().collect();
        if rules != auth.rules() {
            tracing::info!(
                rules = rules.len(),
                "auth rules updated from the configuration"
            );
            auth.set_rules(rules);
        }
        auth.set_default_policy(section.default_policy.unwrap_or(base.policy()));
        for issuer in section.trust {
            auth.trust(issuer);
        }
    }
}

mod duration_text {
    use super::*;

    pub(super) fn serialize<S: Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => serializer.serialize_str(&humantime::format_duration(*d).to_string()),
            None => serializer.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text: Option<String> = Option::deserialize(deserializer)?;
        text.map(|t| {
            humantime::parse_duration(&t).map_err(|e| {
                serde::de::Error::custom(format!(
                    "{t:?} is not a duration ({e}); write e.g. \"500ms\", \"10s\", \"2m\""
                ))
            })
        })
        .transpose()
    }
}

mod policy_text {
    use super::*;

    pub(super) fn serialize<S: Serializer>(
        value: &Option<DefaultPolicy>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(DefaultPolicy::AllowAuthenticated) => {
                serializer.serialize_str("allow-authenticated")
            }
            Some(DefaultPolicy::Deny) => serializer.serialize_str("deny"),
            None => serializer.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<DefaultPolicy>, D::Error> {
        let text: Option<String> = Option::deserialize(deserializer)?;
        text.map(|t| match t.as_str() {
            "allow-authenticated" => Ok(DefaultPolicy::AllowAuthenticated),
            "deny" => Ok(DefaultPolicy::Deny),
            other => Err(serde::de::Error::custom(format!(
                "default_policy is \"allow-authenticated\" or \"deny\", not {other:?}"
            ))),
        })
        .transpose()
    }
}
