//! `AzureTokenSource::from_env`: each rule picks its credential, and that credential gets its own
//! identity's token from the emulator (every request redirected to loopback).

use postgres_entra::{AzureTokenSource, CredentialKind, EnvCredential, TokenSource};
use postgres_entra_testkit::{TENANT_ID, in_app_service_child, run_test_in_child};
use std::time::Duration;

use crate::{Suite, captured_text};

const SCOPE: &str = "https://ossrdbms-aad.database.windows.net/.default";

/// The choice made from exactly `vars`.
fn choose(vars: &[(&str, String)]) -> EnvCredential {
    EnvCredential::choose_from(|name| {
        vars.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.clone())
    })
    .unwrap()
}

/// The app id (client id) in the token `chosen`'s credential gets from the emulator.
async fn app_id_of_token(emulator: &Suite, chosen: &EnvCredential) -> String {
    let source = chosen.token_source_over(emulator.transport()).unwrap();
    let token = source.get_token(SCOPE).await.unwrap();
    token
        .claims()
        .unwrap()
        .app_id()
        .expect("an app id")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rule_picks_its_credential_which_gets_its_identitys_token() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let (sp, workload, managed) = (
        emulator.service_principal(),
        emulator.workload_identity(),
        emulator.managed_identity(),
    );
    let secret = sp.client_secret.clone().unwrap();
    let token_file = emulator.directory().join("federated-token");
    std::fs::write(
        &token_file,
        emulator.federated_assertion(&workload).unwrap(),
    )
    .unwrap();
    let tenant = || ("AZURE_TENANT_ID", TENANT_ID.to_owned());

    // A client secret.
    let chosen = choose(&[
        tenant(),
        ("AZURE_CLIENT_ID", sp.client_id.clone()),
        ("AZURE_CLIENT_SECRET", secret.clone()),
    ]);
    assert_eq!(chosen.kind(), CredentialKind::ClientSecret);
    assert_eq!(chosen.reason(), "AZURE_CLIENT_SECRET is set");
    assert!(!format!("{chosen:?}").contains(&secret), "{chosen:?}");
    assert_eq!(app_id_of_token(&emulator, &chosen).await, sp.client_id);

    // Workload identity, as AKS's webhook sets it up.
    let chosen = choose(&[
        tenant(),
        ("AZURE_CLIENT_ID", workload.client_id.clone()),
        (
            "AZURE_FEDERATED_TOKEN_FILE",
            token_file.display().to_string(),
        ),
        (
            "AZURE_AUTHORITY_HOST",
            "https://login.microsoftonline.com/".into(),
        ),
    ]);
    assert_eq!(chosen.kind(), CredentialKind::WorkloadIdentity);
    assert_eq!(
        app_id_of_token(&emulator, &chosen).await,
        workload.client_id
    );

    // A VM's managed identity, asked for by name: the instance metadata service (the request is
    // redirected to the emulator's IMDS path, never sent to the link-local address).
    let imds_host = [169, 254, 169, 254].map(|o: u8| o.to_string()).join(".");
    let chosen = choose(&[("AZURE_MANAGED_IDENTITY", "1".into())]);
    assert_eq!(chosen.kind(), CredentialKind::ManagedIdentity);
    assert_eq!(app_id_of_token(&emulator, &chosen).await, managed.client_id);
    assert!(
        emulator.transport().original_hosts().contains(&imds_host),
        "IMDS was addressed: {:?}",
        emulator.transport().original_hosts()
    );

    // AZURE_TOKEN_CREDENTIALS decides over the other variables.
    let chosen = choose(&[
        (
            "AZURE_TOKEN_CREDENTIALS",
            "ManagedIdentityCredential".into(),
        ),
        tenant(),
        ("AZURE_CLIENT_SECRET", secret.clone()),
    ]);
    assert_eq!(chosen.kind(), CredentialKind::ManagedIdentity);
    assert_eq!(
        chosen.reason(),
        "AZURE_TOKEN_CREDENTIALS=ManagedIdentityCredential"
    );

    // Nothing set: the developer tools (built, not run: `az` could reach Azure).
    let chosen = choose(&[]);
    assert_eq!(chosen.kind(), CredentialKind::DeveloperTools);
    chosen.token_source().unwrap();
}

/// App Service: the real `from_env()`, in a child process with the platform's variables; its
/// choice is logged at info.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_services_variables_choose_its_managed_identity_and_the_choice_is_logged() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let output = run_test_in_child(
        "from_env::app_service_child",
        emulator.app_service_env(),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert!(
        output.contains(&format!(
            "child: app id {}",
            emulator.managed_identity().client_id
        )),
        "{output}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by app_services_variables_choose_its_managed_identity_and_the_choice_is_logged"]
async fn app_service_child() {
    if !in_app_service_child() {
        return;
    }
    let _capture = captured_text();

    let source = AzureTokenSource::from_env().unwrap();

    let log = captured_text();
    let line = log
        .lines()
        .find(|l| l.contains("credential chosen from the environment"))
        .unwrap_or_else(|| panic!("no line in {log}"));
    assert!(line.contains("INFO"), "{line}");
    assert!(line.contains("managed_identity"), "{line}");
    assert!(line.contains("IDENTITY_ENDPOINT is set"), "{line}");
    let token = source.get_token(SCOPE).await.unwrap();
    println!(
        "child: app id {}",
        token.claims().unwrap().app_id().unwrap()
    );
}
