//! The bridge to `azure_core` credentials: any `TokenCredential` (managed identity, workload
//! identity, client secret, developer tools, ...) becomes a [`TokenSource`], and what the identity
//! provider answered (HTTP status, Entra error code and description) is kept in its errors.

use azure_core::credentials::{Secret, TokenCredential};
use azure_core::error::ErrorKind;
use azure_core::http::{ClientOptions, HttpClient, RetryOptions, Transport, new_http_client};
use azure_identity::{
    ClientAssertionCredentialOptions, ClientSecretCredential, ClientSecretCredentialOptions,
    DeveloperToolsCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    UserAssignedId, WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::error::{Error, TokenError, TokenErrorKind};
use crate::token::{AccessToken, TokenFuture, TokenSource};

/// A [`TokenSource`] over an `azure_identity` credential.
///
/// The constructors build the credentials this library recommends, and build a new one for every
/// request to the identity provider ([`AzureTokenSource::fresh`]): each azure_identity credential
/// keeps a cache of its own and hands back its cached token until 5 minutes before it expires
/// (azure_identity 1.0, `src/cache.rs`), which would overrule the library's refresh at half of the
/// token's life; a new credential has an empty cache, so the request reaches the provider. The
/// credentials of one source share one HTTP client (its connections), and have azure_core's own
/// retry policy off (`RetryOptions::none()`): the token cache already retries (with backoff while
/// a valid token is still served, every 0.8 s while none is), so a failing identity provider's
/// answer (HTTP status, `AADSTS` code) reaches your logs and errors at once instead of after
/// azure_core's eight retries. On a VM, azure_identity's instance metadata (IMDS) credential keeps
/// Microsoft's IMDS retry guidance whatever is asked.
///
/// Some caches are outside the process: the managed-identity endpoint of the platform (Microsoft
/// documents a back-end cache of about 24 hours per resource, and that a refresh cannot be forced:
/// "Are managed identities tokens cached?" in the managed identities FAQ) and the Azure CLI's and
/// Azure Developer CLI's own token caches. When one answers with the token already held, the
/// library asks again once half of what remains has passed (`CacheStats::unchanged` counts these
/// answers), so the margin before expiry is the one that cache leaves.
///
/// [`AzureTokenSource::new`] takes a credential as you built it: its own cache decides when the
/// provider is asked (for azure_identity's, 5 minutes before expiry at the latest), and the
/// library can only ask again as above. Prefer [`AzureTokenSource::fresh`] with a function that
/// builds your credential.
///
/// Its identity, shown in errors, logs and metrics, is the credential's kind and, where the
/// credential shows it, its client id (`ClientSecretCredential (client id 3f2b…)`); give one of
/// your own with [`AzureTokenSource::with_identity`].
pub struct AzureTokenSource {
    credential: Credential,
    identity: String,
}

/// Builds a credential.
type Build = dyn Fn() -> azure_core::Result<Arc<dyn TokenCredential>> + Send + Sync;

enum Credential {
    /// One credential, as the user built it.
    Kept(Arc<dyn TokenCredential>),
    /// A new credential for every request.
    Fresh(Box<Build>),
}

/// azure_core's client options over `http`, without its retry policy.
fn no_retries(http: &Arc<dyn HttpClient>) -> ClientOptions {
    ClientOptions {
        retry: RetryOptions::none(),
        transport: Some(Transport::new(http.clone())),
        ..Default::default()
    }
}

fn credential_error(kind: &str, error: azure_core::Error) -> Error {
    Error::config(format!(
        "cannot build the {kind} credential: {}",
        crate::error::flatten(&error)
    ))
}

/// Where azure_identity's `ManagedIdentityCredential` asks for tokens: the endpoints it supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ManagedIdentityEndpoint {
    /// App Service, Functions, Container Apps: `IDENTITY_ENDPOINT` with `IDENTITY_HEADER`.
    AppService,
    /// The instance metadata service of a VM (no variable).
    Imds,
}

impl ManagedIdentityEndpoint {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::AppService => "App Service's endpoint (IDENTITY_ENDPOINT)",
            Self::Imds => "the instance metadata service",
        }
    }
}

/// The endpoint azure_identity's `ManagedIdentityCredential` takes given the variables that `set`
/// says are set, decided as it decides (azure_identity 1.0, `managed_identity_credential.rs`
/// `get_source`). The platforms it does not support are an error naming them, and so is
/// `IDENTITY_ENDPOINT` without `IDENTITY_HEADER`, which azure_identity would pass over to ask the
/// instance metadata service instead.
pub(crate) fn managed_identity_endpoint(
    set: impl Fn(&str) -> bool,
) -> Result<ManagedIdentityEndpoint, Error> {
    let unsupported = |platform: &str, variables: &str| {
        Err(Error::config(format!(
            "{variables} set: the {platform} managed identity, which azure_identity does not \
             support (App Service's IDENTITY_ENDPOINT with IDENTITY_HEADER, or a VM's instance \
             metadata service, are)"
        )))
    };
    if set("IDENTITY_ENDPOINT") {
        if set("IDENTITY_HEADER") {
            if set("IDENTITY_SERVER_THUMBPRINT") {
                return unsupported(
                    "Service Fabric",
                    "IDENTITY_ENDPOINT, IDENTITY_HEADER and IDENTITY_SERVER_THUMBPRINT are",
                );
            }
            return Ok(ManagedIdentityEndpoint::AppService);
        }
        if set("IMDS_ENDPOINT") {
            return unsupported("Azure Arc", "IDENTITY_ENDPOINT and IMDS_ENDPOINT are");
        }
        return Err(Error::config(
            "IDENTITY_ENDPOINT is set without IDENTITY_HEADER: azure_identity would pass it over \
             and ask the instance metadata service instead; set both (as App Service does) or \
             neither",
        ));
    }
    if set("MSI_ENDPOINT") {
        return if set("MSI_SECRET") {
            unsupported("Azure ML", "MSI_ENDPOINT and MSI_SECRET are")
        } else {
            unsupported("Cloud Shell", "MSI_ENDPOINT is")
        };
    }
    Ok(ManagedIdentityEndpoint::Imds)
}

/// The managed-identity endpoint this process's environment gives azure_identity, which reads it
/// itself (a variable set to the empty string counts as unset, as in [`EnvCredential`]'s rules).
///
/// [`EnvCredential`]: crate::EnvCredential
pub(crate) fn process_managed_identity_endpoint() -> Result<ManagedIdentityEndpoint, Error> {
    managed_identity_endpoint(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
}

/// The most a federated token file may hold: a Kubernetes service-account token is a JWT of a
/// kilobyte or two.
const MAX_FEDERATED_TOKEN_FILE: u64 = 64 * 1024;

/// That the federated token file is a regular file of a token's size: azure_identity reads the
/// whole file (`std::fs::read_to_string`), which never ends on a device such as `/dev/zero` or a
/// pipe nobody writes to.
fn check_federated_token_file(path: &Path) -> azure_core::Result<()> {
    let refuse = |why: String| {
        Err(azure_core::Error::with_message(
            ErrorKind::Credential,
            format!("the federated token file {}: {why}", path.display()),
        ))
    };
    match std::fs::metadata(path) {
        Err(error) => refuse(error.to_string()),
        Ok(file) if !file.is_file() => refuse("not a regular file".to_owned()),
        Ok(file) if file.len() > MAX_FEDERATED_TOKEN_FILE => refuse(format!(
            "{} bytes, more than a token's {MAX_FEDERATED_TOKEN_FILE}",
            file.len()
        )),
        Ok(_) => Ok(()),
    }
}

impl AzureTokenSource {
    /// A source over `credential`, built as you chose, named after the credential's kind and
    /// client id. Its own cache decides when the identity provider is asked (see above).
    pub fn new(credential: Arc<dyn TokenCredential>) -> Self {
        let identity = describe(credential.as_ref());
        Self {
            credential: Credential::Kept(credential),
            identity,
        }
    }

    /// A source that builds a new credential with `build` for every request, so that no
    /// credential's cache answers in place of the identity provider: e.g. a
    /// `ClientCertificateCredential`, or a credential with your own HTTP client or proxy
    /// (`ClientOptions::transport`; give every credential the same client, built once, and they
    /// share its connections). `build` runs now, once, to check it (its error is a configuration
    /// error, and the credential names the source), then for each request; it must not block.
    pub fn fresh<C, F>(build: F) -> Result<Self, Error>
    where
        C: TokenCredential + 'static,
        F: Fn() -> azure_core::Result<Arc<C>> + Send + Sync + 'static,
    {
        Self::fresh_as("azure", build)
    }

    /// [`AzureTokenSource::fresh`], its configuration error naming the credential's `kind`.
    fn fresh_as<C, F>(kind: &str, build: F) -> Result<Self, Error>
    where
        C: TokenCredential + 'static,
        F: Fn() -> azure_core::Result<Arc<C>> + Send + Sync + 'static,
    {
        let first = build().map_err(|e| credential_error(kind, e))?;
        let identity = describe(first.as_ref());
        Ok(Self {
            credential: Credential::Fresh(Box::new(move || {
                build().map(|c| c as Arc<dyn TokenCredential>)
            })),
            identity,
        })
    }

    /// A source over `credential` named `identity` (e.g. the managed identity's name).
    #[must_use]
    pub fn with_identity(mut self, identity: impl Into<String>) -> Self {
        self.identity = identity.into();
        self
    }

    /// The managed identity of the Azure resource this code runs on (App Service, Functions,
    /// Container Apps, a VM, AKS with pod identity): the system-assigned one, or the user-assigned
    /// one `user_assigned` names by client, object or resource id.
    ///
    /// azure_identity reads the endpoint from the environment: `IDENTITY_ENDPOINT` with
    /// `IDENTITY_HEADER` (App Service and the platforms built on it), else a VM's instance metadata
    /// service. An error, before any request: the platforms azure_identity does not support
    /// (Service Fabric, Azure Arc, Cloud Shell, Azure ML: `IDENTITY_SERVER_THUMBPRINT`,
    /// `IMDS_ENDPOINT`, `MSI_ENDPOINT`), and `IDENTITY_ENDPOINT` without `IDENTITY_HEADER`, which
    /// azure_identity would pass over to ask the instance metadata service.
    pub fn managed_identity(user_assigned: Option<UserAssignedId>) -> Result<Self, Error> {
        Self::managed_identity_over(user_assigned, new_http_client(None))
    }

    pub(crate) fn managed_identity_over(
        user_assigned: Option<UserAssignedId>,
        http: Arc<dyn HttpClient>,
    ) -> Result<Self, Error> {
        process_managed_identity_endpoint()?;
        Self::fresh_as("managed identity", move || {
            // `..Default::default()` for the fields azure_identity may add.
            #[allow(clippy::needless_update)]
            let options = ManagedIdentityCredentialOptions {
                user_assigned_id: user_assigned.clone(),
                client_options: no_retries(&http),
                ..Default::default()
            };
            ManagedIdentityCredential::new(Some(options))
        })
    }

    /// AKS workload identity: the federated token in `AZURE_FEDERATED_TOKEN_FILE`, for
    /// `AZURE_CLIENT_ID` in `AZURE_TENANT_ID` (the variables the workload identity webhook sets).
    pub fn workload_identity() -> Result<Self, Error> {
        Self::workload_identity_over(
            WorkloadIdentityCredentialOptions::default(),
            new_http_client(None),
        )
    }

    pub(crate) fn workload_identity_over(
        settings: WorkloadIdentityCredentialOptions,
        http: Arc<dyn HttpClient>,
    ) -> Result<Self, Error> {
        let WorkloadIdentityCredentialOptions {
            client_id,
            tenant_id,
            token_file_path,
            ..
        } = settings;
        Self::fresh_as("workload identity", move || {
            // azure_identity reads the whole file, from AZURE_FEDERATED_TOKEN_FILE when no path
            // is given.
            let file = token_file_path.clone().or_else(|| {
                std::env::var_os("AZURE_FEDERATED_TOKEN_FILE")
                    .filter(|path| !path.is_empty())
                    .map(PathBuf::from)
            });
            if let Some(file) = &file {
                check_federated_token_file(file)?;
            }
            // `..Default::default()` for the fields azure_identity may add.
            #[allow(clippy::needless_update)]
            let options = WorkloadIdentityCredentialOptions {
                credential_options: ClientAssertionCredentialOptions {
                    client_options: no_retries(&http),
                },
                client_id: client_id.clone(),
                tenant_id: tenant_id.clone(),
                token_file_path: token_file_path.clone(),
                ..Default::default()
            };
            WorkloadIdentityCredential::new(Some(options))
        })
    }

    /// An app registration's client secret.
    pub fn client_secret(
        tenant_id: &str,
        client_id: impl Into<String>,
        secret: impl Into<String>,
    ) -> Result<Self, Error> {
        Self::client_secret_over(
            tenant_id,
            client_id.into(),
            Secret::new(secret.into()),
            new_http_client(None),
        )
    }

    pub(crate) fn client_secret_over(
        tenant_id: &str,
        client_id: String,
        secret: Secret,
        http: Arc<dyn HttpClient>,
    ) -> Result<Self, Error> {
        let tenant_id = tenant_id.to_owned();
        Self::fresh_as("client secret", move || {
            ClientSecretCredential::new(
                &tenant_id,
                client_id.clone(),
                secret.clone(),
                Some(ClientSecretCredentialOptions {
                    client_options: no_retries(&http),
                }),
            )
        })
    }

    /// A developer's own login: the Azure CLI (`az login`), else the Azure Developer CLI (`azd
    /// auth login`). These run the tool for every request, and the tool answers from its own token
    /// cache until it decides to renew (see above).
    pub fn developer_tools() -> Result<Self, Error> {
        DeveloperToolsCredential::new(None)
            .map(|credential| Self::new(credential))
            .map_err(|e| credential_error("developer tools", e))
    }
}

/// The credential's kind (the last segment of the type name its `Debug` prints) and its
/// `client_id` field where its `Debug` shows one; azure_identity's `Debug` impls print nothing
/// secret, and only these two pieces are kept.
fn describe(credential: &dyn TokenCredential) -> String {
    let debug = format!("{credential:?}");
    let path = debug.split([' ', '{', '(', '<']).next().unwrap_or_default();
    let kind = path.rsplit("::").next().unwrap_or_default();
    let kind = if !kind.is_empty() && kind.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        kind
    } else {
        "azure credential"
    };
    let client_id = debug
        .split_once("client_id: \"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(id, _)| id)
        .filter(|id| {
            !id.is_empty()
                && id.len() <= 64
                && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    match client_id {
        Some(id) => format!("{kind} (client id {id})"),
        None => kind.to_owned(),
    }
}

impl fmt::Debug for AzureTokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureTokenSource")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// What the provider said, from the first HTTP answer in `error`'s chain (credentials wrap the
/// HTTP error in an authentication error), else the kind of the transport failure. The error is
/// kept as the source.
fn classify(error: azure_core::Error) -> TokenError {
    what_failed(&error).with_source(error)
}

/// The classification of `error`, with no message: the error itself is the source.
fn what_failed(error: &azure_core::Error) -> TokenError {
    let mut kind = TokenErrorKind::Other;
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = next {
        if let Some(azure) = e.downcast_ref::<azure_core::Error>() {
            match azure.kind() {
                ErrorKind::HttpResponse {
                    status,
                    error_code,
                    raw_response,
                } => {
                    let status = u16::from(*status);
                    let mut result = TokenError::new(TokenErrorKind::from_http_status(status), "")
                        .with_http_status(status);
                    let oauth_error = raw_response.as_deref().and_then(|response| {
                        serde_json::from_slice::<serde_json::Value>(response.body().as_ref())
                            .ok()?
                            .get("error")?
                            .as_str()
                            .map(str::to_owned)
                    });
                    let code = match (oauth_error, error_code) {
                        (Some(error), Some(codes)) => Some(format!("{error} (AADSTS{codes})")),
                        (Some(error), None) => Some(error),
                        (None, Some(codes)) if codes.chars().all(|c| c.is_ascii_digit()) => {
                            Some(format!("AADSTS{codes}"))
                        }
                        (None, codes) => codes.clone(),
                    };
                    if let Some(code) = code {
                        result = result.with_provider_code(code);
                    }
                    if let Some(delay) = raw_response
                        .as_deref()
                        .and_then(|r| retry_after(r.headers()))
                    {
                        result = result.with_retry_after(delay);
                    }
                    return result;
                }
                ErrorKind::Io | ErrorKind::Connection => kind = TokenErrorKind::Unreachable,
                ErrorKind::DataConversion if kind == TokenErrorKind::Other => {
                    kind = TokenErrorKind::InvalidResponse;
                }
                _ => {}
            }
        }
        next = e.source();
    }
    TokenError::new(kind, "")
}

/// How long the provider asked to be left alone: `retry-after-ms`, `x-ms-retry-after-ms`, or
/// `Retry-After` in seconds or as an HTTP date (RFC 9110, section 10.2.3), read by azure_core's own
/// retry policy's function. A date already past is no wait.
fn retry_after(headers: &azure_core::http::headers::Headers) -> Option<Duration> {
    use azure_core::http::headers::{RETRY_AFTER, RETRY_AFTER_MS, X_MS_RETRY_AFTER_MS};
    let delay = azure_core::http::policies::get_retry_after(
        headers,
        azure_core::time::OffsetDateTime::now_utc,
        &[RETRY_AFTER_MS, X_MS_RETRY_AFTER_MS, RETRY_AFTER],
    )?;
    Some(Duration::try_from(delay).unwrap_or(Duration::ZERO))
}

impl TokenSource for AzureTokenSource {
    fn get_token<'a>(&'a self, scope: &'a str) -> TokenFuture<'a> {
        Box::pin(async move {
            let credential = match &self.credential {
                Credential::Kept(credential) => credential.clone(),
                Credential::Fresh(build) => build().map_err(classify)?,
            };
            match credential.get_token(&[scope], None).await {
                Ok(token) => Ok(AccessToken::new(
                    token.token.secret(),
                    SystemTime::from(token.expires_on),
                )),
                Err(error) => Err(classify(error)),
            }
        })
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use azure_core::http::{AsyncRawResponse, Request, StatusCode, headers::Headers};

    /// A federated token file that never ends (a device, a pipe) or is far larger than a token is
    /// refused before azure_identity reads it (it would read for ever, or all of it).
    #[test]
    fn a_federated_token_file_that_is_no_token_is_refused_before_it_is_read() {
        let directory =
            std::env::temp_dir().join(format!("postgres-entra-federated-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let large = directory.join("large");
        std::fs::write(&large, vec![b'a'; 65 * 1024]).unwrap();
        let pipe = directory.join("pipe");
        let _ = std::fs::remove_file(&pipe);
        let made = std::process::Command::new("mkfifo")
            .arg(&pipe)
            .status()
            .unwrap();
        assert!(made.success());
        for (file, says) in [
            (PathBuf::from("/dev/zero"), "not a regular file"),
            (pipe, "not a regular file"),
            (directory.clone(), "not a regular file"),
            (large, "66560 bytes, more than a token's 65536"),
            (directory.join("missing"), "No such file"),
        ] {
            let options = WorkloadIdentityCredentialOptions {
                client_id: Some("c".into()),
                tenant_id: Some("t".into()),
                token_file_path: Some(file.clone()),
                ..Default::default()
            };
            let error = AzureTokenSource::workload_identity_over(
                options,
                Arc::new(InProcessProvider::default()),
            )
            .err()
            .unwrap_or_else(|| panic!("{} was taken", file.display()));
            let text = error.to_string();
            assert!(
                text.contains(&format!(
                    "the federated token file {}: {says}",
                    file.display()
                )),
                "{text}"
            );
        }
        std::fs::remove_dir_all(&directory).unwrap();
    }
    use std::sync::atomic::{AtomicU32, Ordering};

    /// An identity provider inside the test process, standing for Entra and the managed-identity
    /// endpoints with nothing cached: every token request gets a new token, and is counted.
    /// Nothing leaves the process.
    #[derive(Debug, Default)]
    struct InProcessProvider {
        token_requests: AtomicU32,
    }

    #[async_trait::async_trait]
    impl HttpClient for InProcessProvider {
        async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
            if !request.url().path().contains("token") {
                return Ok(AsyncRawResponse::from_bytes(
                    StatusCode::NotFound,
                    Headers::new(),
                    "",
                ));
            }
            let n = self.token_requests.fetch_add(1, Ordering::SeqCst) + 1;
            let expires_on = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs()
                + 3600;
            // Both answers in one: Entra's (`expires_in` a number) and the managed-identity
            // endpoints' (`expires_on` a string of unix seconds).
            let body = serde_json::json!({
                "token_type": "Bearer",
                "expires_in": 3600,
                "ext_expires_in": 3600,
                "expires_on": expires_on.to_string(),
                "resource": "https://ossrdbms-aad.database.windows.net",
                "access_token": format!("token-{n}"),
            });
            let mut headers = Headers::new();
            headers.insert("content-type", "application/json");
            Ok(AsyncRawResponse::from_bytes(
                StatusCode::Ok,
                headers,
                body.to_string(),
            ))
        }
    }

    async fn two_tokens(source: &AzureTokenSource) -> [String; 2] {
        let scope = crate::Cloud::Public.scope();
        let first = source.get_token(scope).await.unwrap();
        let second = source.get_token(scope).await.unwrap();
        [first.secret().to_owned(), second.secret().to_owned()]
    }

    /// Each constructor builds a new credential per request, so each request reaches the
    /// provider; one credential reused (what `new` takes) answers the second from its cache.
    #[tokio::test]
    async fn the_constructors_credentials_never_answer_from_their_own_cache() {
        let provider = Arc::new(InProcessProvider::default());
        let http = || provider.clone() as Arc<dyn HttpClient>;
        let tenant = "3f7c9a52-8d1e-4b6a-9c0f-5e2d7a1b4c68";
        let client = "2d97a1b4-0000-4b6a-9c0f-5e2d7a1b4c68";
        let file = std::env::temp_dir().join(format!(
            "postgres-entra-federated-token-{}",
            std::process::id()
        ));
        std::fs::write(&file, "a.federated.assertion").unwrap();
        let sources = [
            AzureTokenSource::client_secret_over(tenant, client.into(), "s".into(), http())
                .unwrap(),
            AzureTokenSource::managed_identity_over(
                Some(UserAssignedId::ClientId(client.into())),
                http(),
            )
            .unwrap(),
            AzureTokenSource::workload_identity_over(
                WorkloadIdentityCredentialOptions {
                    client_id: Some(client.into()),
                    tenant_id: Some(tenant.into()),
                    token_file_path: Some(file.clone()),
                    ..Default::default()
                },
                http(),
            )
            .unwrap(),
        ];
        for source in &sources {
            let before = provider.token_requests.load(Ordering::SeqCst);
            let [first, second] = two_tokens(source).await;
            assert_ne!(first, second, "{source:?}");
            assert_eq!(
                provider.token_requests.load(Ordering::SeqCst) - before,
                2,
                "{source:?}"
            );
        }
        std::fs::remove_file(&file).unwrap();

        let kept = ClientSecretCredential::new(
            tenant,
            client.into(),
            "s".to_owned().into(),
            Some(ClientSecretCredentialOptions {
                client_options: no_retries(&http()),
            }),
        )
        .unwrap();
        let before = provider.token_requests.load(Ordering::SeqCst);
        let [first, second] = two_tokens(&AzureTokenSource::new(kept)).await;
        assert_eq!(first, second, "azure_identity's cache answered");
        assert_eq!(provider.token_requests.load(Ordering::SeqCst) - before, 1);

        // A credential that cannot be built is a configuration error when the source is made.
        let error = AzureTokenSource::fresh(|| {
            ClientSecretCredential::new("not a tenant", client.into(), "s".to_owned().into(), None)
        })
        .unwrap_err();
        assert!(matches!(error, Error::Config { .. }), "{error}");
        assert!(
            error
                .to_string()
                .contains("cannot build the azure credential"),
            "{error}"
        );
    }

    /// `describe` reads azure_identity's `Debug` output: pinned here against the real types.
    #[test]
    fn credentials_are_described_by_kind_and_client_id_from_their_debug_text() {
        let secret = ClientSecretCredential::new(
            "3f7c9a52-8d1e-4b6a-9c0f-5e2d7a1b4c68",
            "2d97a1b4-0000-4b6a-9c0f-5e2d7a1b4c68".to_owned(),
            "not-a-real-secret".to_owned().into(),
            None,
        )
        .unwrap();
        let debug = format!("{secret:?}");
        assert!(!debug.contains("not-a-real-secret"), "{debug}");
        assert_eq!(
            describe(secret.as_ref()),
            "ClientSecretCredential (client id 2d97a1b4-0000-4b6a-9c0f-5e2d7a1b4c68)"
        );
        let tools = DeveloperToolsCredential::new(None).unwrap();
        assert_eq!(describe(tools.as_ref()), "DeveloperToolsCredential");
    }

    fn headers(pairs: &[(&'static str, String)]) -> azure_core::http::headers::Headers {
        let mut headers = azure_core::http::headers::Headers::new();
        for (name, value) in pairs {
            headers.insert(*name, value.clone());
        }
        headers
    }

    #[test]
    fn retry_after_is_read_in_seconds_milliseconds_or_as_an_http_date() {
        use azure_core::time::{Duration as Span, OffsetDateTime, to_rfc7231};
        assert_eq!(
            retry_after(&headers(&[("retry-after", "7".into())])),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after-ms", "1500".into())])),
            Some(Duration::from_millis(1500))
        );
        let later = to_rfc7231(&(OffsetDateTime::now_utc() + Span::seconds(120)));
        let wait = retry_after(&headers(&[("retry-after", later)])).unwrap();
        assert!(
            wait > Duration::from_secs(110) && wait <= Duration::from_secs(120),
            "{wait:?}"
        );
        let past = to_rfc7231(&(OffsetDateTime::now_utc() - Span::seconds(120)));
        assert_eq!(
            retry_after(&headers(&[("retry-after", past)])),
            Some(Duration::ZERO)
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", "-5".into())])),
            Some(Duration::ZERO),
            "a wait below zero is none"
        );
        for junk in ["", "soon", "Fri, 31 Feb 2026 99:00:00 GMT", "1e9", "\u{0}"] {
            assert_eq!(
                retry_after(&headers(&[("retry-after", junk.to_owned())])),
                None,
                "{junk:?}"
            );
        }
        assert_eq!(retry_after(&headers(&[])), None);
    }

    /// Whatever a provider (or a proxy in between) puts in the header, reading it never panics
    /// and never asks for more than the value says.
    #[test]
    fn any_retry_after_value_is_read_without_a_panic() {
        let alphabet: Vec<char> = "0123456789 ,:-+.eEGMTFriSatJanDec\u{0}\u{7f}é"
            .chars()
            .collect();
        let mut rng = fastrand::Rng::with_seed(18);
        for _ in 0..20_000 {
            let value: String = (0..rng.usize(0..32))
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect();
            let read = retry_after(&headers(&[("retry-after", value.clone())]));
            if let (Some(read), Ok(seconds)) = (read, value.trim().parse::<u64>()) {
                assert_eq!(read, Duration::from_secs(seconds), "{value:?}");
            }
        }
    }
}
