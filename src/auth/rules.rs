//! Rules: who may do what, in priority order, with deny winning ties.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::PeerId;

/// What kind of thing a rule protects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A service by name: every endpoint of it. Names are service names, e.g. `greeter`.
    Service,
    /// One endpoint of a service, named `service/Endpoint`, e.g. `greeter/Greeter.Hello`.
    Endpoint,
    /// A broker topic (publishing on it).
    Topic,
    /// A store table, named `database/table` (writing and deleting in it).
    Table,
    /// A service name, as announced in the registry: who may offer the service.
    Announce,
    /// A configuration path in the mesh's configuration, e.g. `auth.rules` (setting it with
    /// [`Config::set_in_mesh`](crate::config::Config::set_in_mesh)).
    Config,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Service => "service",
            Self::Endpoint => "endpoint",
            Self::Topic => "topic",
            Self::Table => "table",
            Self::Announce => "announce",
            Self::Config => "config",
        }
    }
}

/// A protected thing, or a pattern of them: a kind and a name in which `*` matches any run of
/// characters (`greeter/Admin.*`, `*`).
///
/// Written as text `kind:name`: `service:greeter`, `endpoint:greeter/Greeter.*`, `topic:orders`,
/// `table:micromesh/default`, `announce:greeter`, `config:auth.*`.
///
/// ```
/// use micromesh::auth::Resource;
///
/// let pattern: Resource = "endpoint:greeter/Admin.*".parse()?;
/// assert!(pattern.matches(&Resource::endpoint("greeter", "Admin.Reset")));
/// assert!(!pattern.matches(&Resource::endpoint("greeter", "Greeter.Hello")));
/// assert!(!pattern.matches(&Resource::service("greeter")));
/// # Ok::<(), micromesh::auth::RuleError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Resource {
    kind: Kind,
    name: String,
}

impl Resource {
    /// A resource or pattern of `kind`.
    pub fn new(kind: Kind, name: impl Into<String>) -> Self {
        Self {
            kind,
            name: name.into(),
        }
    }

    /// A service.
    pub fn service(name: impl Into<String>) -> Self {
        Self::new(Kind::Service, name)
    }

    /// An endpoint of a service.
    pub fn endpoint(service: &str, endpoint: &str) -> Self {
        Self::new(Kind::Endpoint, format!("{service}/{endpoint}"))
    }

    /// A broker topic.
    pub fn topic(name: impl Into<String>) -> Self {
        Self::new(Kind::Topic, name)
    }

    /// A store table.
    pub fn table(database: &str, table: &str) -> Self {
        Self::new(Kind::Table, format!("{database}/{table}"))
    }

    /// A service name, as offered in the registry.
    pub fn announce(service: impl Into<String>) -> Self {
        Self::new(Kind::Announce, service)
    }

    /// A path of the mesh's configuration, e.g. `greeter.greeting`.
    pub fn config(path: impl Into<String>) -> Self {
        Self::new(Kind::Config, path)
    }

    /// The kind.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The name or pattern.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this pattern covers `resource`: same kind, and the name matches with `*` standing
    /// for any run of characters.
    pub fn matches(&self, resource: &Resource) -> bool {
        self.kind == resource.kind && glob(self.name.as_bytes(), resource.name.as_bytes())
    }
}

/// Matches `name` against `pattern`, where `*` matches any run of bytes. Iterative, linear in
/// practice: the last `*` seen is the only backtracking point.
fn glob(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, n));
            p += 1;
        } else if p < pattern.len() && pattern[p] == name[n] {
            p += 1;
            n += 1;
        } else if let Some((sp, sn)) = star {
            p = sp + 1;
            n = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

/// Who a rule is about.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Subject {
    /// One peer.
    Peer(PeerId),
    /// Every peer holding this role through a valid grant.
    Role(String),
    /// Every peer of the network (every connection is authenticated by its key).
    Authenticated,
}

impl Subject {
    /// A role.
    pub fn role(role: impl Into<String>) -> Self {
        Self::Role(role.into())
    }

    pub(crate) fn matches(&self, peer: &PeerId, roles: &[String]) -> bool {
        match self {
            Self::Peer(p) => p == peer,
            Self::Role(role) => roles.iter().any(|r| r == role),
            Self::Authenticated => true,
        }
    }
}

/// Allow or deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    /// The subject may.
    Allow,
    /// The subject may not.
    Deny,
}

/// One rule: `effect` for `subject` on the resources matching `resource`, at `priority`.
///
/// Rules are evaluated by priority, highest first: the rules matching a request at the highest
/// priority that has any decide it, and if any of them denies, the request is denied (deny wins
/// ties). When no rule matches, the [default policy](super::DefaultPolicy) decides.
///
/// Text form (CLI, JSON files): `allow|deny <resource> <subject> [priority]`, where a subject is
/// `peer:<peer id>`, `role:<name>` or `any`:
///
/// ```
/// use micromesh::auth::{Effect, Resource, Rule, Subject};
///
/// let rule: Rule = "deny endpoint:greeter/Admin.* any 10".parse()?;
/// assert_eq!(rule, Rule::deny(Resource::endpoint("greeter", "Admin.*"), Subject::Authenticated).priority(10));
/// let rule: Rule = "allow endpoint:greeter/Admin.* role:admin 20".parse()?;
/// assert_eq!(rule.effect, Effect::Allow);
/// assert_eq!(rule.to_string(), "allow endpoint:greeter/Admin.* role:admin 20");
/// # Ok::<(), micromesh::auth::RuleError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    /// The resources the rule is about (a pattern).
    pub resource: Resource,
    /// Who the rule is about.
    pub subject: Subject,
    /// Allow or deny.
    pub effect: Effect,
    /// Higher is evaluated first.
    pub priority: i32,
}

impl Rule {
    /// Allows `subject` on `resource`, at priority 0.
    pub fn allow(resource: Resource, subject: Subject) -> Self {
        Self {
            resource,
            subject,
            effect: Effect::Allow,
            priority: 0,
        }
    }

    /// Denies `subject` on `resource`, at priority 0.
    pub fn deny(resource: Resource, subject: Subject) -> Self {
        Self {
            effect: Effect::Deny,
            ..Self::allow(resource, subject)
        }
    }

    /// Sets the priority (higher is evaluated first).
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }
}

/// Why a rule's text does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid rule {text:?}: {reason}")]
pub struct RuleError {
    text: String,
    reason: String,
}

fn rule_error(text: &str, reason: impl Into<String>) -> RuleError {
    RuleError {
        text: text.to_owned(),
        reason: reason.into(),
    }
}

impl FromStr for Resource {
    type Err = RuleError;

    fn from_str(s: &str) -> Result<Self, RuleError> {
        let Some((kind, name)) = s.split_once(':') else {
            return Err(rule_error(
                s,
                "a resource is kind:name, e.g. service:greeter",
            ));
        };
        let kind = match kind {
            "service" => Kind::Service,
            "endpoint" => Kind::Endpoint,
            "topic" => Kind::Topic,
            "table" => Kind::Table,
            "announce" => Kind::Announce,
            "config" => Kind::Config,
            other => {
                return Err(rule_error(
                    s,
                    format!(
                        "unknown resource kind {other:?}: use service, endpoint, topic, table, \
                         announce or config"
                    ),
                ));
            }
        };
        if name.is_empty() {
            return Err(rule_error(s, "a resource needs a name or pattern"));
        }
        Ok(Self::new(kind, name))
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.as_str(), self.name)
    }
}

impl FromStr for Subject {
    type Err = RuleError;

    fn from_str(s: &str) -> Result<Self, RuleError> {
        if s == "any" {
            return Ok(Self::Authenticated);
        }
        if let Some(peer) = s.strip_prefix("peer:") {
            return peer
                .parse()
                .map(Self::Peer)
                .map_err(|e| rule_error(s, format!("not a peer id: {e}")));
        }
        if let Some(role) = s.strip_prefix("role:") {
            super::grant::check_role(role).map_err(|e| rule_error(s, e))?;
            return Ok(Self::Role(role.to_owned()));
        }
        Err(rule_error(
            s,
            "a subject is peer:<peer id>, role:<name> or any",
        ))
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Peer(peer) => write!(f, "peer:{peer}"),
            Self::Role(role) => write!(f, "role:{role}"),
            Self::Authenticated => f.write_str("any"),
        }
    }
}

impl FromStr for Rule {
    type Err = RuleError;

    fn from_str(s: &str) -> Result<Self, RuleError> {
        let words: Vec<&str> = s.split_whitespace().collect();
        let (effect, resource, subject, priority) = match words.as_slice() {
            [e, r, s] => (e, r, s, None),
            [e, r, s, p] => (e, r, s, Some(p)),
            _ => {
                return Err(rule_error(
                    s,
                    "a rule is `allow|deny <resource> <subject> [priority]`",
                ));
            }
        };
        let effect = match *effect {
            "allow" => Effect::Allow,
            "deny" => Effect::Deny,
            other => return Err(rule_error(s, format!("{other:?} is not allow or deny"))),
        };
        let priority = match priority {
            Some(p) => p
                .parse()
                .map_err(|_| rule_error(s, format!("priority {p:?} is not an integer")))?,
            None => 0,
        };
        Ok(Self {
            resource: resource
                .parse()
                .map_err(|e: RuleError| rule_error(s, e.reason))?,
            subject: subject
                .parse()
                .map_err(|e: RuleError| rule_error(s, e.reason))?,
            effect,
            priority,
        })
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let effect = match self.effect {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
        };
        write!(
            f,
            "{effect} {} {} {}",
            self.resource, self.subject, self.priority
        )
    }
}

impl Serialize for Rule {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rule {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Rules sorted for evaluation: highest priority first.
#[derive(Clone, Debug, Default)]
pub(crate) struct RuleSet {
    rules: Vec<Rule>,
}

impl RuleSet {
    pub(crate) fn new(mut rules: Vec<Rule>) -> Self {
        rules.sort_by_key(|r| std::cmp::Reverse(r.priority));
        Self { rules }
    }

    pub(crate) fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether any rule about `resources` names a role: only then do a peer's grants matter.
    pub(crate) fn needs_roles(&self, resources: &[Resource]) -> bool {
        self.rules.iter().any(|r| {
            matches!(r.subject, Subject::Role(_)) && resources.iter().any(|x| r.resource.matches(x))
        })
    }

    /// The decision of the rules for `peer` with `roles` on any of `resources`: `None` when no
    /// rule matches. Returns the deciding rule.
    pub(crate) fn decide(
        &self,
        peer: &PeerId,
        roles: &[String],
        resources: &[Resource],
    ) -> Option<&Rule> {
        let mut decided: Option<&Rule> = None;
        for rule in &self.rules {
            if let Some(d) = decided
                && rule.priority < d.priority
            {
                break;
            }
            if !resources.iter().any(|x| rule.resource.matches(x))
                || !rule.subject.matches(peer, roles)
            {
                continue;
            }
            match (decided, rule.effect) {
                (None, _) | (Some(_), Effect::Deny) => decided = Some(rule),
                (Some(_), Effect::Allow) => {}
            }
            if rule.effect == Effect::Deny {
                break;
            }
        }
        decided
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_runs_of_anything() {
        assert!(glob(b"*", b""));
        assert!(glob(b"*", b"anything/at.all"));
        assert!(glob(b"greeter/Admin.*", b"greeter/Admin.Reset"));
        assert!(!glob(b"greeter/Admin.*", b"greeter/Greeter.Hello"));
        assert!(glob(b"*/Admin.*", b"billing/Admin.Refund"));
        assert!(glob(b"a*b*c", b"aXXbYYbZc"));
        assert!(!glob(b"a*b*c", b"aXXbYY"));
        assert!(glob(b"exact", b"exact"));
        assert!(!glob(b"exact", b"exactly"));
        assert!(!glob(b"", b"x"));
    }

    fn peer() -> PeerId {
        PeerId::random()
    }

    #[test]
    fn highest_priority_decides_and_deny_wins_ties() {
        let admin = vec!["admin".to_owned()];
        let target = [Resource::endpoint("greeter", "Admin.Reset")];
        let set = RuleSet::new(vec![
            "deny endpoint:greeter/Admin.* any 10".parse().unwrap(),
            "allow endpoint:greeter/Admin.* role:admin 20"
                .parse()
                .unwrap(),
            "allow service:greeter any 0".parse().unwrap(),
        ]);
        let p = peer();
        assert_eq!(
            set.decide(&p, &admin, &target).unwrap().effect,
            Effect::Allow
        );
        assert_eq!(set.decide(&p, &[], &target).unwrap().effect, Effect::Deny);
        // A tie at the top priority: deny wins, whatever the order given.
        for rules in [
            vec!["allow topic:t role:a 5", "deny topic:t role:a 5"],
            vec!["deny topic:t role:a 5", "allow topic:t role:a 5"],
        ] {
            let set = RuleSet::new(rules.iter().map(|r| r.parse().unwrap()).collect());
            let decided = set.decide(&p, &["a".into()], &[Resource::topic("t")]);
            assert_eq!(decided.unwrap().effect, Effect::Deny);
        }
        // A lower-priority deny loses to a higher allow.
        let set = RuleSet::new(vec![
            "deny topic:* any 0".parse().unwrap(),
            Rule::allow(Resource::topic("t"), Subject::Peer(p)).priority(1),
        ]);
        assert_eq!(
            set.decide(&p, &[], &[Resource::topic("t")]).unwrap().effect,
            Effect::Allow
        );
        assert_eq!(
            set.decide(&peer(), &[], &[Resource::topic("t")])
                .unwrap()
                .effect,
            Effect::Deny
        );
        assert!(set.decide(&p, &[], &[Resource::service("t")]).is_none());
    }

    #[test]
    fn rules_need_roles_only_when_a_role_rule_matches() {
        let set = RuleSet::new(vec![
            "allow endpoint:greeter/Admin.* role:admin".parse().unwrap(),
            "deny topic:* any".parse().unwrap(),
        ]);
        assert!(set.needs_roles(&[Resource::endpoint("greeter", "Admin.X")]));
        assert!(!set.needs_roles(&[Resource::endpoint("greeter", "Greeter.Hello")]));
        assert!(!set.needs_roles(&[Resource::topic("x")]));
    }

    #[test]
    fn bad_rule_text_is_refused_clearly() {
        for (text, needle) in [
            ("allow service:x", "a rule is"),
            ("permit service:x any", "not allow or deny"),
            ("allow thing:x any", "unknown resource kind"),
            ("allow service:x role:", "a role is"),
            ("allow service:x peer:nope", "not a peer id"),
            ("allow service:x any high", "not an integer"),
        ] {
            let e = text.parse::<Rule>().unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}
