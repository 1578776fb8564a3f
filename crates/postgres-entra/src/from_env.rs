//! A credential chosen from the environment, by fixed rules over the variables the Azure SDKs and
//! Azure's hosts set. Nothing is tried and nothing on the network is probed to decide: the first
//! rule whose variables are set wins, and a choice that lacks a variable it needs is an error
//! naming it (never a fall-through to the next rule).

use azure_core::credentials::Secret;
use azure_core::http::{HttpClient, new_http_client};
use azure_identity::{UserAssignedId, WorkloadIdentityCredentialOptions};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::azure::{
    AzureTokenSource, ManagedIdentityEndpoint, managed_identity_endpoint,
    process_managed_identity_endpoint,
};
use crate::error::Error;

/// The credentials [`EnvCredential`] chooses from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CredentialKind {
    /// An app registration's client secret: `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`,
    /// `AZURE_CLIENT_SECRET` ([`AzureTokenSource::client_secret`]).
    ClientSecret,
    /// AKS workload identity: `AZURE_FEDERATED_TOKEN_FILE`, `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`
    /// ([`AzureTokenSource::workload_identity`]).
    WorkloadIdentity,
    /// The Azure resource's managed identity ([`AzureTokenSource::managed_identity`]); a
    /// user-assigned one when `AZURE_CLIENT_ID` is set.
    ManagedIdentity,
    /// A developer's `az login` or `azd auth login` ([`AzureTokenSource::developer_tools`]).
    DeveloperTools,
}

impl CredentialKind {
    /// A short name, for logs: `client_secret`, `workload_identity`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::ClientSecret => "client_secret",
            CredentialKind::WorkloadIdentity => "workload_identity",
            CredentialKind::ManagedIdentity => "managed_identity",
            CredentialKind::DeveloperTools => "developer_tools",
        }
    }
}

/// The variables the rules read. Their names may be shown; their values never are.
pub(crate) const CREDENTIAL_VARIABLES: [&str; 14] = [
    "AZURE_TOKEN_CREDENTIALS",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_FEDERATED_TOKEN_FILE",
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "IDENTITY_SERVER_THUMBPRINT",
    "IMDS_ENDPOINT",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "AZURE_MANAGED_IDENTITY",
    "AZURE_AUTHORITY_HOST",
];

/// The credential the environment names, and why: what [`AzureTokenSource::from_env`] builds.
///
/// The rules, in order (a variable set to the empty string counts as unset):
///
/// 1. `AZURE_TOKEN_CREDENTIALS` (the Azure SDKs' variable for `DefaultAzureCredential`), when
///    set, decides: `ManagedIdentityCredential`, `WorkloadIdentityCredential`,
///    `EnvironmentCredential` (a client secret), `AzureCliCredential`,
///    `AzureDeveloperCliCredential` or `dev` (the developer tools); `prod` applies rules 2-5 and
///    then takes the managed identity. Any other value is an error.
/// 2. `AZURE_CLIENT_SECRET`: the client secret of `AZURE_CLIENT_ID` in `AZURE_TENANT_ID`.
///    `AZURE_CLIENT_CERTIFICATE_PATH` is an error: certificates need azure_identity's
///    `client_certificate` feature (OpenSSL); build that credential with
///    [`AzureTokenSource::fresh`].
/// 3. `AZURE_FEDERATED_TOKEN_FILE`: workload identity (the variables AKS's webhook sets).
/// 4. `IDENTITY_ENDPOINT` with `IDENTITY_HEADER` (App Service, Functions, Container Apps): the
///    managed identity at that endpoint. The managed identities azure_identity does not support are
///    an error naming them: Service Fabric (`IDENTITY_SERVER_THUMBPRINT` too), Azure Arc
///    (`IDENTITY_ENDPOINT` with `IMDS_ENDPOINT`), Cloud Shell and Azure ML (`MSI_ENDPOINT`); so
///    is `IDENTITY_ENDPOINT` without `IDENTITY_HEADER`, which azure_identity would pass over to
///    ask the instance metadata service.
/// 5. `AZURE_MANAGED_IDENTITY` (this library's, for a VM): the managed identity from the
///    instance metadata service. A VM sets no variable, and the rules never probe the address.
/// 6. Otherwise the developer tools (`az`, then `azd`): they run a local program, no request is
///    made to find out.
///
/// A managed identity is the user-assigned one with client id `AZURE_CLIENT_ID` when that is set,
/// else the system-assigned one. Its endpoint (App Service's, or a VM's instance metadata
/// service) follows rule 4's variables whichever rule chose it, and azure_identity reads them
/// from the process's environment itself: a choice made from other values
/// ([`EnvCredential::choose_from`]) builds only where the process's environment names the same
/// endpoint.
#[derive(Clone)]
pub struct EnvCredential {
    chosen: Chosen,
    reason: String,
    seen: Vec<&'static str>,
}

/// The credential chosen, with the values it is built from.
#[derive(Clone)]
enum Chosen {
    ClientSecret {
        tenant_id: String,
        client_id: String,
        secret: Secret,
    },
    WorkloadIdentity {
        tenant_id: String,
        client_id: String,
        token_file: PathBuf,
    },
    ManagedIdentity {
        client_id: Option<String>,
        endpoint: ManagedIdentityEndpoint,
    },
    DeveloperTools,
}

impl fmt::Debug for EnvCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnvCredential")
            .field("kind", &self.kind())
            .field("reason", &self.reason)
            .field("seen", &self.seen)
            .finish_non_exhaustive()
    }
}

impl EnvCredential {
    /// The credential this process's environment names (see the rules above).
    pub fn choose() -> Result<Self, Error> {
        Self::choose_from(|name| std::env::var(name).ok())
    }

    /// The credential the variables `lookup` returns name: the same rules over values of your
    /// own (a configuration file's, or a test's).
    pub fn choose_from(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, Error> {
        let var = |name: &str| lookup(name).filter(|value| !value.is_empty());
        let required = |name: &'static str, kind: CredentialKind| {
            var(name).ok_or_else(|| {
                Error::config(format!(
                    "{name} is not set, and the {} credential needs it",
                    kind.as_str()
                ))
            })
        };
        let (kind, reason) = match var("AZURE_TOKEN_CREDENTIALS").as_deref().map(str::trim) {
            None => by_variables(&var)?.unwrap_or_else(|| {
                (
                    CredentialKind::DeveloperTools,
                    "none of AZURE_CLIENT_SECRET, AZURE_FEDERATED_TOKEN_FILE, IDENTITY_ENDPOINT, \
                     MSI_ENDPOINT or AZURE_MANAGED_IDENTITY is set"
                        .to_owned(),
                )
            }),
            Some(value) => {
                let named = format!("AZURE_TOKEN_CREDENTIALS={value}");
                match value.to_ascii_lowercase().as_str() {
                    "managedidentitycredential" => (CredentialKind::ManagedIdentity, named),
                    "workloadidentitycredential" => (CredentialKind::WorkloadIdentity, named),
                    "environmentcredential" => (CredentialKind::ClientSecret, named),
                    "azureclicredential" | "azuredeveloperclicredential" | "dev" => {
                        (CredentialKind::DeveloperTools, named)
                    }
                    "prod" => match by_variables(&var)? {
                        Some((kind, why)) => (kind, format!("{named}, {why}")),
                        None => (CredentialKind::ManagedIdentity, named),
                    },
                    _ => {
                        return Err(Error::config(format!(
                            "AZURE_TOKEN_CREDENTIALS is `{value}`; give ManagedIdentityCredential, \
                             WorkloadIdentityCredential, EnvironmentCredential, AzureCliCredential, \
                             AzureDeveloperCliCredential, dev or prod"
                        )));
                    }
                }
            }
        };
        let chosen = match kind {
            CredentialKind::ClientSecret => Chosen::ClientSecret {
                tenant_id: required("AZURE_TENANT_ID", kind)?,
                client_id: required("AZURE_CLIENT_ID", kind)?,
                secret: Secret::new(required("AZURE_CLIENT_SECRET", kind)?),
            },
            CredentialKind::WorkloadIdentity => Chosen::WorkloadIdentity {
                tenant_id: required("AZURE_TENANT_ID", kind)?,
                client_id: required("AZURE_CLIENT_ID", kind)?,
                token_file: required("AZURE_FEDERATED_TOKEN_FILE", kind)?.into(),
            },
            CredentialKind::ManagedIdentity => Chosen::ManagedIdentity {
                client_id: var("AZURE_CLIENT_ID"),
                endpoint: managed_identity_endpoint(|name| var(name).is_some())?,
            },
            CredentialKind::DeveloperTools => Chosen::DeveloperTools,
        };
        // Where the secret or assertion goes when AZURE_AUTHORITY_HOST names the authority: shown
        // with the reason (azure_identity sends it to any HTTPS host this variable names).
        let reason = match (&chosen, var("AZURE_AUTHORITY_HOST")) {
            (Chosen::ClientSecret { .. } | Chosen::WorkloadIdentity { .. }, Some(authority)) => {
                format!("{reason}; sent to the authority {authority} (AZURE_AUTHORITY_HOST)")
            }
            _ => reason,
        };
        Ok(Self {
            chosen,
            reason,
            seen: CREDENTIAL_VARIABLES
                .into_iter()
                .filter(|name| var(name).is_some())
                .collect(),
        })
    }

    /// Which credential.
    pub fn kind(&self) -> CredentialKind {
        match self.chosen {
            Chosen::ClientSecret { .. } => CredentialKind::ClientSecret,
            Chosen::WorkloadIdentity { .. } => CredentialKind::WorkloadIdentity,
            Chosen::ManagedIdentity { .. } => CredentialKind::ManagedIdentity,
            Chosen::DeveloperTools => CredentialKind::DeveloperTools,
        }
    }

    /// Why this one: the variables that decided (names, never their values), and, for a client
    /// secret or workload identity, the authority host `AZURE_AUTHORITY_HOST` sends it to.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The credential variables that are set (names only): those the rules read, and
    /// `AZURE_AUTHORITY_HOST`, which the credentials read.
    pub fn variables_set(&self) -> &[&'static str] {
        &self.seen
    }

    /// The token source over this credential, built as [`AzureTokenSource`]'s constructors build
    /// it.
    pub fn token_source(&self) -> Result<AzureTokenSource, Error> {
        self.token_source_over(new_http_client(None))
    }

    /// [`EnvCredential::token_source`] with its requests sent through `http` (your proxy or client).
    /// The developer tools make no request of their own and do not use it.
    pub fn token_source_over(&self, http: Arc<dyn HttpClient>) -> Result<AzureTokenSource, Error> {
        match &self.chosen {
            Chosen::ClientSecret {
                tenant_id,
                client_id,
                secret,
            } => AzureTokenSource::client_secret_over(
                tenant_id,
                client_id.clone(),
                secret.clone(),
                http,
            ),
            Chosen::WorkloadIdentity {
                tenant_id,
                client_id,
                token_file,
            } => AzureTokenSource::workload_identity_over(
                WorkloadIdentityCredentialOptions {
                    client_id: Some(client_id.clone()),
                    tenant_id: Some(tenant_id.clone()),
                    token_file_path: Some(token_file.clone()),
                    ..Default::default()
                },
                http,
            ),
            Chosen::ManagedIdentity {
                client_id,
                endpoint,
            } => {
                let here = process_managed_identity_endpoint()?;
                if here != *endpoint {
                    return Err(Error::config(format!(
                        "the values given name {} for the managed identity, but azure_identity \
                         reads this process's environment, which names {}",
                        endpoint.as_str(),
                        here.as_str()
                    )));
                }
                AzureTokenSource::managed_identity_over(
                    client_id.clone().map(UserAssignedId::ClientId),
                    http,
                )
            }
            Chosen::DeveloperTools => AzureTokenSource::developer_tools(),
        }
    }
}

/// Rules 2-5: the credential the variables name, if any.
fn by_variables(
    var: &impl Fn(&str) -> Option<String>,
) -> Result<Option<(CredentialKind, String)>, Error> {
    if var("AZURE_CLIENT_SECRET").is_some() {
        return Ok(Some((
            CredentialKind::ClientSecret,
            "AZURE_CLIENT_SECRET is set".to_owned(),
        )));
    }
    if var("AZURE_CLIENT_CERTIFICATE_PATH").is_some() {
        return Err(Error::config(
            "AZURE_CLIENT_CERTIFICATE_PATH is set, and certificates need azure_identity's \
             client_certificate feature (OpenSSL): build a ClientCertificateCredential with \
             AzureTokenSource::fresh",
        ));
    }
    if var("AZURE_FEDERATED_TOKEN_FILE").is_some() {
        return Ok(Some((
            CredentialKind::WorkloadIdentity,
            "AZURE_FEDERATED_TOKEN_FILE is set (and no AZURE_CLIENT_SECRET)".to_owned(),
        )));
    }
    if var("IDENTITY_ENDPOINT").is_some() || var("MSI_ENDPOINT").is_some() {
        // The platforms azure_identity does not support are refused with the endpoint.
        return Ok(Some((
            CredentialKind::ManagedIdentity,
            "IDENTITY_ENDPOINT and IDENTITY_HEADER are set (App Service, Functions, Container \
             Apps)"
                .to_owned(),
        )));
    }
    if var("AZURE_MANAGED_IDENTITY").is_some() {
        return Ok(Some((
            CredentialKind::ManagedIdentity,
            "AZURE_MANAGED_IDENTITY is set (the instance metadata service of a VM)".to_owned(),
        )));
    }
    Ok(None)
}

impl AzureTokenSource {
    /// The credential this process's environment names, by [`EnvCredential`]'s rules (no
    /// network probe), its choice and the reason logged at info.
    pub fn from_env() -> Result<Self, Error> {
        let chosen = EnvCredential::choose()?;
        tracing::info!(
            credential = chosen.kind().as_str(),
            reason = chosen.reason(),
            "Entra ID credential chosen from the environment"
        );
        chosen.token_source()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choose(vars: &[(&str, &str)]) -> Result<EnvCredential, Error> {
        EnvCredential::choose_from(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    fn kind(vars: &[(&str, &str)]) -> CredentialKind {
        choose(vars).unwrap().kind()
    }

    fn refusal(vars: &[(&str, &str)]) -> String {
        choose(vars).unwrap_err().to_string()
    }

    const SP: [(&str, &str); 3] = [
        ("AZURE_TENANT_ID", "t"),
        ("AZURE_CLIENT_ID", "c"),
        ("AZURE_CLIENT_SECRET", "s3cr3t-value"),
    ];

    #[test]
    fn the_first_rule_whose_variables_are_set_decides() {
        use CredentialKind::*;
        let wif = [
            ("AZURE_TENANT_ID", "t"),
            ("AZURE_CLIENT_ID", "c"),
            ("AZURE_FEDERATED_TOKEN_FILE", "/var/run/token"),
        ];
        assert_eq!(kind(&SP), ClientSecret);
        assert_eq!(kind(&[SP[0], SP[1], SP[2], wif[2]]), ClientSecret);
        assert_eq!(kind(&wif), WorkloadIdentity);
        assert_eq!(
            kind(&[wif[0], wif[1], wif[2], ("IDENTITY_ENDPOINT", "http://x")]),
            WorkloadIdentity
        );
        assert_eq!(kind(&APP_SERVICE), ManagedIdentity);
        assert_eq!(kind(&[("AZURE_MANAGED_IDENTITY", "1")]), ManagedIdentity);
        assert_eq!(kind(&[]), DeveloperTools);
        // An empty variable is unset.
        assert_eq!(kind(&[("AZURE_CLIENT_SECRET", "")]), DeveloperTools);
        let chosen = choose(&APP_SERVICE).unwrap();
        assert_eq!(
            chosen.reason(),
            "IDENTITY_ENDPOINT and IDENTITY_HEADER are set (App Service, Functions, Container Apps)"
        );
        assert_eq!(
            chosen.variables_set(),
            ["IDENTITY_ENDPOINT", "IDENTITY_HEADER"]
        );
    }

    const APP_SERVICE: [(&str, &str); 2] = [
        ("IDENTITY_ENDPOINT", "http://127.0.0.1:8081/msi/token"),
        ("IDENTITY_HEADER", "h"),
    ];

    /// azure_identity 1.0 (`managed_identity_credential.rs`, `get_source`) passes over
    /// `IDENTITY_ENDPOINT` without `IDENTITY_HEADER` and asks the instance metadata service, and
    /// refuses Service Fabric, Azure Arc, Cloud Shell and Azure ML: each is refused here, by
    /// whichever rule the managed identity was chosen, naming what is set.
    #[test]
    fn a_managed_identity_endpoint_azure_identity_would_not_use_is_refused_by_name() {
        let endpoint = APP_SERVICE[0];
        for (vars, says) in [
            (
                vec![endpoint],
                "IDENTITY_ENDPOINT is set without IDENTITY_HEADER",
            ),
            (
                vec![endpoint, ("AZURE_MANAGED_IDENTITY", "1")],
                "ask the instance metadata service instead",
            ),
            (
                vec![
                    endpoint,
                    ("AZURE_TOKEN_CREDENTIALS", "ManagedIdentityCredential"),
                ],
                "without IDENTITY_HEADER",
            ),
            (
                vec![endpoint, ("IMDS_ENDPOINT", "http://127.0.0.1:1")],
                "the Azure Arc managed identity",
            ),
            (
                vec![
                    APP_SERVICE[0],
                    APP_SERVICE[1],
                    ("IDENTITY_SERVER_THUMBPRINT", "ab"),
                ],
                "the Service Fabric managed identity",
            ),
            (
                vec![("MSI_ENDPOINT", "http://127.0.0.1:1")],
                "MSI_ENDPOINT is set: the Cloud Shell managed identity",
            ),
            (
                vec![("MSI_ENDPOINT", "http://x"), ("MSI_SECRET", "s")],
                "the Azure ML managed identity, which azure_identity does not support",
            ),
            (
                vec![
                    ("AZURE_TOKEN_CREDENTIALS", "prod"),
                    ("MSI_ENDPOINT", "http://x"),
                ],
                "Cloud Shell",
            ),
        ] {
            let text = refusal(&vars);
            assert!(text.contains(says), "{vars:?}: {text}");
        }
        // Not a managed identity: its variables are not looked at.
        assert_eq!(
            kind(&[SP[0], SP[1], SP[2], ("MSI_ENDPOINT", "http://x")]),
            CredentialKind::ClientSecret
        );
    }

    /// azure_identity reads the managed identity's endpoint from the process's environment, not
    /// from the values a choice was made from: the source builds only where both name the same.
    #[test]
    fn a_managed_identity_chosen_from_other_values_builds_only_where_the_process_agrees() {
        let here = process_managed_identity_endpoint();
        for (vars, there) in [
            (&APP_SERVICE[..], ManagedIdentityEndpoint::AppService),
            (
                &[("AZURE_MANAGED_IDENTITY", "1")][..],
                ManagedIdentityEndpoint::Imds,
            ),
        ] {
            let built = choose(vars).unwrap().token_source();
            match &here {
                Ok(here) if *here == there => {
                    built.unwrap();
                }
                Ok(here) => {
                    let text = built.unwrap_err().to_string();
                    assert!(
                        text.contains(&format!(
                            "name {} for the managed identity, but azure_identity reads this \
                             process's environment, which names {}",
                            there.as_str(),
                            here.as_str()
                        )),
                        "{text}"
                    );
                }
                Err(_) => {
                    built.unwrap_err();
                }
            }
        }
    }

    #[test]
    fn azure_token_credentials_names_the_credential_over_every_other_variable() {
        use CredentialKind::*;
        let with = |value| {
            let mut vars = SP.to_vec();
            vars.push(("AZURE_TOKEN_CREDENTIALS", value));
            kind(&vars)
        };
        assert_eq!(with("ManagedIdentityCredential"), ManagedIdentity);
        assert_eq!(with("managedidentitycredential "), ManagedIdentity);
        assert_eq!(with("dev"), DeveloperTools);
        assert_eq!(with("AzureCliCredential"), DeveloperTools);
        assert_eq!(with("EnvironmentCredential"), ClientSecret);
        assert_eq!(with("prod"), ClientSecret);
        assert_eq!(
            kind(&[("AZURE_TOKEN_CREDENTIALS", "prod")]),
            ManagedIdentity
        );
        let text = refusal(&[("AZURE_TOKEN_CREDENTIALS", "ChainedTokenCredential")]);
        assert!(text.contains("`ChainedTokenCredential`"), "{text}");
        let text = refusal(&[("AZURE_TOKEN_CREDENTIALS", "WorkloadIdentityCredential")]);
        assert!(text.contains("AZURE_TENANT_ID is not set"), "{text}");
    }

    #[test]
    fn a_choice_missing_what_it_needs_is_an_error_naming_it_not_the_next_rule() {
        let text = refusal(&[SP[0], SP[2]]);
        assert!(
            text.contains("AZURE_CLIENT_ID is not set, and the client_secret credential needs it"),
            "{text}"
        );
        let text = refusal(&[
            ("AZURE_FEDERATED_TOKEN_FILE", "/t"),
            ("IDENTITY_ENDPOINT", "x"),
        ]);
        assert!(text.contains("AZURE_TENANT_ID is not set"), "{text}");
        let text = refusal(&[("AZURE_CLIENT_CERTIFICATE_PATH", "/c.pfx")]);
        assert!(text.contains("client_certificate feature"), "{text}");
    }

    #[test]
    fn the_reason_names_an_authority_host_the_secret_goes_to() {
        let mut vars = SP.to_vec();
        vars.push(("AZURE_AUTHORITY_HOST", "https://login.example.net"));
        assert_eq!(
            choose(&vars).unwrap().reason(),
            "AZURE_CLIENT_SECRET is set; sent to the authority https://login.example.net \
             (AZURE_AUTHORITY_HOST)"
        );
        // A managed identity or the developer tools send no secret there.
        assert_eq!(
            choose(&[
                ("AZURE_MANAGED_IDENTITY", "1"),
                ("AZURE_AUTHORITY_HOST", "https://login.example.net")
            ])
            .unwrap()
            .reason(),
            "AZURE_MANAGED_IDENTITY is set (the instance metadata service of a VM)"
        );
    }

    #[test]
    fn no_value_is_shown_only_names() {
        let chosen = choose(&SP).unwrap();
        let shown = format!("{chosen:?} {:#?} {}", chosen, chosen.reason());
        assert!(!shown.contains("s3cr3t-value"), "{shown}");
        assert_eq!(
            chosen.variables_set(),
            ["AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"]
        );
    }
}
