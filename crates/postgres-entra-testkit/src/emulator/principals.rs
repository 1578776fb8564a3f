//! The emulator's principals: its identities and their roles, the tokens it mints for them, and
//! azure_identity credentials pointed at its mock endpoints.

use azure_identity::{
    ClientAssertionCredentialOptions, ClientSecretCredential, ClientSecretCredentialOptions,
    ManagedIdentityCredential, ManagedIdentityCredentialOptions, WorkloadIdentityCredential,
    WorkloadIdentityCredentialOptions,
};
use std::sync::Arc;
use std::time::Duration;

use super::{Emulator, TENANT_ID};
use crate::Error;
use crate::identity::{Identity, IdentityKind};
use crate::issuer::TokenOptions;

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// `CREATE ROLE role LOGIN` unless the role exists: roles belong to the whole cluster, which on a
/// shared cluster other emulators made them in.
fn create_login_role(role: &str) -> String {
    format!(
        "DO $create$ BEGIN CREATE ROLE {role} LOGIN; \
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $create$;\n"
    )
}

/// The SQL that creates `identity`'s role, as an Entra administrator's
/// `pgaadauth_create_principal` would: a login role that records which principal it maps to, and
/// may create tables in the database it is run in.
pub(super) fn role_sql(identity: &Identity) -> String {
    let role = quote_ident(&identity.role_name);
    let comment = format!(
        "Entra principal: kind={:?} oid={} appid={}",
        identity.kind, identity.object_id, identity.client_id
    );
    format!(
        "{}COMMENT ON ROLE {role} IS {}; GRANT CREATE ON SCHEMA public TO {role};\n",
        create_login_role(&role),
        quote_literal(&comment)
    )
}

impl Emulator {
    /// Registers a new identity and creates its role.
    pub async fn add_identity(&self, identity: Identity) -> Result<(), Error> {
        self.execute(&role_sql(&identity)).await?;
        self.shared.add_identity(identity);
        Ok(())
    }

    /// Creates a group role named `name` whose members are `members`: each logs in as the group
    /// with a token of its own, as Azure allows (Microsoft Learn: "the only difference between
    /// signing in as a group member and as an individual user lies in the username").
    pub async fn add_group(&self, name: &str, members: &[Identity]) -> Result<Identity, Error> {
        let group = Identity::group(name, members.iter().map(|m| m.object_id.clone()));
        self.add_identity(group.clone()).await?;
        Ok(group)
    }

    /// Removes `member` from `group`: its next login as the group is refused (sessions already
    /// open stay, as on Azure, until they end).
    pub fn remove_group_member(&self, group: &Identity, member: &Identity) -> Result<(), Error> {
        self.change_identity(&group.role_name, |g| {
            g.members.retain(|oid| *oid != member.object_id)
        })
    }

    /// Adds `member` to `group` (again): its next login as the group is accepted.
    pub fn add_group_member(&self, group: &Identity, member: &Identity) -> Result<(), Error> {
        let oid = member.object_id.clone();
        self.change_identity(&group.role_name, |g| {
            if !g.members.contains(&oid) {
                g.members.push(oid);
            }
        })
    }

    /// Disables `identity` in the directory: the identity provider refuses it new tokens (HTTP
    /// 400, AADSTS7000112 for an application; "Identity not found" for a managed identity), while
    /// its unexpired tokens still log in, as on Azure.
    pub fn disable(&self, identity: &Identity) -> Result<(), Error> {
        self.change_identity(&identity.role_name, |i| i.disabled = true)
    }

    fn change_identity(&self, role: &str, change: impl FnOnce(&mut Identity)) -> Result<(), Error> {
        if self.shared.update_identity(role, change) {
            Ok(())
        } else {
            Err(Error::Setup(format!("no identity with role `{role}`")))
        }
    }

    /// Creates a role that logs in with a fixed `password` over the same TLS and LDAP path as
    /// tokens: the baseline for benchmarks ("what if there were no token to fetch").
    pub async fn add_password_role(&self, role: &str, password: &str) -> Result<(), Error> {
        self.execute(&create_login_role(&quote_ident(role))).await?;
        self.shared.add_static_password(role, password);
        Ok(())
    }

    /// All registered identities.
    pub fn identities(&self) -> Vec<Identity> {
        self.shared.identities()
    }

    fn first(&self, kind: IdentityKind, wants: impl Fn(&Identity) -> bool) -> Identity {
        self.identities()
            .into_iter()
            .find(|i| i.kind == kind && wants(i))
            .expect("default identities are always registered")
    }

    /// The user (role named by UPN), for tokens minted with [`Emulator::issue_token`].
    pub fn user(&self) -> Identity {
        self.first(IdentityKind::User, |_| true)
    }

    /// The service principal that authenticates with a client secret.
    pub fn service_principal(&self) -> Identity {
        self.first(IdentityKind::ServicePrincipal, |i| {
            i.client_secret.is_some()
        })
    }

    /// The service principal with a federated credential (Kubernetes workload identity).
    pub fn workload_identity(&self) -> Identity {
        self.first(IdentityKind::ServicePrincipal, |i| {
            i.federated_subject.is_some()
        })
    }

    /// The managed identity served by the managed-identity endpoints.
    pub fn managed_identity(&self) -> Identity {
        self.first(IdentityKind::ManagedIdentity, |_| true)
    }

    /// Mints a token for `identity` directly (as Entra would issue one), recording it as issued.
    pub fn issue_token(&self, identity: &Identity, options: TokenOptions) -> Result<String, Error> {
        let token = self
            .shared
            .issuer
            .mint(identity, &options, self.shared.token_lifetime())?;
        self.shared.record_issued(&token);
        Ok(token)
    }

    /// A federated (Kubernetes service-account) token for a workload identity's client assertion.
    pub fn federated_assertion(&self, identity: &Identity) -> Result<String, Error> {
        let subject = identity.federated_subject.as_deref().ok_or_else(|| {
            Error::Setup(format!(
                "{} has no federated credential",
                identity.role_name
            ))
        })?;
        self.shared
            .issuer
            .mint_assertion(subject, Duration::from_secs(3600))
    }

    /// azure_identity's `ClientSecretCredential` for `identity`, pointed at the mock, without
    /// azure_core's own retries (as the README recommends).
    pub fn client_secret_credential(
        &self,
        identity: &Identity,
    ) -> Result<Arc<ClientSecretCredential>, Error> {
        self.client_secret_credential_with(identity, self.transport.client_options())
    }

    /// azure_identity's `ClientSecretCredential` for `identity` with `client_options` (which must
    /// carry a [`crate::LoopbackTransport`]: the credential addresses Entra itself).
    pub fn client_secret_credential_with(
        &self,
        identity: &Identity,
        client_options: azure_core::http::ClientOptions,
    ) -> Result<Arc<ClientSecretCredential>, Error> {
        let secret = identity
            .client_secret
            .clone()
            .ok_or_else(|| Error::Setup(format!("{} has no client secret", identity.role_name)))?;
        Ok(ClientSecretCredential::new(
            TENANT_ID,
            identity.client_id.clone(),
            secret.into(),
            Some(ClientSecretCredentialOptions { client_options }),
        )?)
    }

    /// What builds azure_identity's `ClientSecretCredential` for `identity`, pointed at the mock
    /// without azure_core's own retries, for `AzureTokenSource::fresh`: a new credential (its cache
    /// empty) at each call, as the library's own constructors build them.
    pub fn client_secret_credentials(
        &self,
        identity: &Identity,
    ) -> Result<
        impl Fn() -> azure_core::Result<Arc<ClientSecretCredential>> + Send + Sync + 'static,
        Error,
    > {
        let secret = identity
            .client_secret
            .clone()
            .ok_or_else(|| Error::Setup(format!("{} has no client secret", identity.role_name)))?;
        let (client_id, transport) = (identity.client_id.clone(), self.transport.clone());
        Ok(move || {
            ClientSecretCredential::new(
                TENANT_ID,
                client_id.clone(),
                secret.clone().into(),
                Some(ClientSecretCredentialOptions {
                    client_options: transport.client_options(),
                }),
            )
        })
    }

    /// What builds azure_identity's `ManagedIdentityCredential` with the redirecting transport,
    /// for `AzureTokenSource::fresh`: a new credential (its cache empty) at each call.
    pub fn managed_identity_credentials(
        &self,
    ) -> impl Fn() -> azure_core::Result<Arc<ManagedIdentityCredential>> + Send + Sync + 'static
    {
        let transport = self.transport.clone();
        move || {
            ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                client_options: transport.client_options(),
                ..Default::default()
            }))
        }
    }

    /// azure_identity's `WorkloadIdentityCredential` for `identity`, with its federated token written
    /// to a file in the emulator's directory, pointed at the mock.
    pub fn workload_identity_credential(
        &self,
        identity: &Identity,
    ) -> Result<Arc<WorkloadIdentityCredential>, Error> {
        let path = self
            .directory()
            .join(format!("federated-token-{}", identity.client_id));
        std::fs::write(&path, self.federated_assertion(identity)?)?;
        Ok(WorkloadIdentityCredential::new(Some(
            WorkloadIdentityCredentialOptions {
                credential_options: ClientAssertionCredentialOptions {
                    client_options: self.transport.client_options(),
                },
                client_id: Some(identity.client_id.clone()),
                tenant_id: Some(TENANT_ID.to_owned()),
                token_file_path: Some(path),
            },
        ))?)
    }

    /// azure_identity's `ManagedIdentityCredential` with the redirecting transport: whichever
    /// endpoint it picks (App Service from the environment, or IMDS), the request lands on the mock.
    pub fn managed_identity_credential(&self) -> Result<Arc<ManagedIdentityCredential>, Error> {
        Ok(ManagedIdentityCredential::new(Some(
            ManagedIdentityCredentialOptions {
                client_options: self.transport.client_options(),
                ..Default::default()
            },
        ))?)
    }
}
