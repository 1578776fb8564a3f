//! The Entra principals the emulator knows, each mapped to a PostgreSQL role the way Azure maps them.

use std::fmt;

/// What kind of Entra principal an identity is; decides the token's claims and the role's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdentityKind {
    /// A person; the role is named after the user principal name (`upn`).
    User,
    /// An application (service principal); the role is named after its display name.
    ServicePrincipal,
    /// A managed identity; the role is named after its display name (the identity resource's name).
    ManagedIdentity,
    /// A group; its role is named after its display name, and any member logs in as it with the
    /// member's own token.
    Group,
}

/// An Entra principal registered with the emulated server.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Identity {
    /// Kind of principal.
    pub kind: IdentityKind,
    /// PostgreSQL role: the UPN for users, the display name for applications and managed identities.
    pub role_name: String,
    /// Entra object id (`oid`), which the server matches at login.
    pub object_id: String,
    /// Application (client) id (`appid`).
    pub client_id: String,
    /// Client secret, for service principals that authenticate with one.
    pub client_secret: Option<String>,
    /// Subject of the federated credential, for workload identities.
    pub federated_subject: Option<String>,
    /// For a group: the object ids of its members.
    pub members: Vec<String>,
    /// Disabled (or deleted) in the directory: the identity provider issues it no tokens.
    pub disabled: bool,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("kind", &self.kind)
            .field("role_name", &self.role_name)
            .field("object_id", &self.object_id)
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret.as_ref().map(|_| "_"))
            .field("federated_subject", &self.federated_subject)
            .field("members", &self.members)
            .field("disabled", &self.disabled)
            .finish()
    }
}

impl Identity {
    /// A new identity of `kind` named `role_name`, with fresh object and client ids.
    pub fn new(kind: IdentityKind, role_name: impl Into<String>) -> Self {
        Self {
            kind,
            role_name: role_name.into(),
            object_id: uuid::Uuid::new_v4().to_string(),
            client_id: uuid::Uuid::new_v4().to_string(),
            client_secret: None,
            federated_subject: None,
            members: Vec::new(),
            disabled: false,
        }
    }

    /// A group named `name` whose members are the identities with these object ids.
    pub fn group(name: impl Into<String>, members: impl IntoIterator<Item = String>) -> Self {
        let mut group = Self::new(IdentityKind::Group, name);
        group.members = members.into_iter().collect();
        group
    }

    /// Gives the identity a client secret.
    #[must_use]
    pub fn with_secret(mut self, secret: impl Into<String>) -> Self {
        self.client_secret = Some(secret.into());
        self
    }

    /// Gives the identity a federated credential for `subject`.
    #[must_use]
    pub fn with_federated_subject(mut self, subject: impl Into<String>) -> Self {
        self.federated_subject = Some(subject.into());
        self
    }
}

/// The identities every emulator starts with.
pub(crate) fn defaults() -> Vec<Identity> {
    let secret = format!("emu~{}", uuid::Uuid::new_v4().simple());
    vec![
        Identity::new(IdentityKind::User, "alice@contoso.onmicrosoft.com"),
        Identity::new(IdentityKind::ServicePrincipal, "orders-api").with_secret(secret),
        Identity::new(IdentityKind::ServicePrincipal, "orders-worker")
            .with_federated_subject("system:serviceaccount:default:orders-worker"),
        Identity::new(IdentityKind::ManagedIdentity, "orders-mi"),
    ]
}
