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

/// The real `from_env()` (in a child), and the line it logged about its choice.
fn from_env_and_its_line() -> (AzureTokenSource, String) {
    let _capture = captured_text();
    let source = AzureTokenSource::from_env().unwrap();
    let log = captured_text();
    let line = log
        .lines()
        .find(|l| l.contains("credential chosen from the environment"))
        .unwrap_or_else(|| panic!("no line in {log}"))
        .to_owned();
    (source, line)
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
    let (source, line) = from_env_and_its_line();
    assert!(line.contains("INFO"), "{line}");
    assert!(line.contains("managed_identity"), "{line}");
    assert!(
        line.contains("IDENTITY_ENDPOINT and IDENTITY_HEADER are set"),
        "{line}"
    );
    let token = source.get_token(SCOPE).await.unwrap();
    println!(
        "child: app id {}",
        token.claims().unwrap().app_id().unwrap()
    );
}

/// The developer tools, the rule when no variable is set: the real `from_env()`, in a child whose
/// variables are all empty (unset, by the rules) and whose `az` is a script on its PATH answering
/// as the Azure CLI does (`az account get-access-token -o json --scope ...`, azure_identity 1.0
/// `azure_cli_credential.rs`) with a token the emulator issued to its user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_variable_set_the_developer_tools_run_az_for_the_users_token() {
    use postgres_entra_testkit::TokenOptions;
    use std::os::unix::fs::PermissionsExt;
    const EXPIRES_IN: i64 = 3000;
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let user = emulator.user();
    let token = emulator
        .issue_token(&user, TokenOptions::default().expires_in(EXPIRES_IN))
        .unwrap();
    let bin = emulator.directory().join("developer-tools");
    std::fs::create_dir_all(&bin).unwrap();
    let expires_on = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + EXPIRES_IN;
    std::fs::write(
        bin.join("answer.json"),
        format!(
            r#"{{"accessToken":"{token}","expiresOn":"","expires_on":{expires_on},"tenant":"{TENANT_ID}","tokenType":"Bearer"}}"#
        ),
    )
    .unwrap();
    let asked = bin.join("asked");
    let az = bin.join("az");
    std::fs::write(
        &az,
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$*\" > '{}'\ncat '{}'\n",
            asked.display(),
            bin.join("answer.json").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&az, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Every credential variable of this process's, empty (unset, by the rules): the child checks
    // that none is left set.
    let mut env: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .filter(|name| {
            ["AZURE_", "IDENTITY_", "MSI_", "IMDS_"]
                .iter()
                .any(|prefix| name.starts_with(prefix))
        })
        .map(|name| (name, String::new()))
        .collect();
    env.push(("PATH".into(), format!("{}:/usr/bin:/bin", bin.display())));

    let output = run_test_in_child(
        "from_env::developer_tools_child",
        env,
        Duration::from_secs(60),
    )
    .await
    .unwrap();

    assert!(
        output.contains(&format!("child: upn {}", user.role_name)),
        "{output}"
    );
    assert_eq!(
        std::fs::read_to_string(&asked).unwrap().trim(),
        format!("account get-access-token -o json --scope {SCOPE}")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by with_no_variable_set_the_developer_tools_run_az_for_the_users_token"]
async fn developer_tools_child() {
    if !postgres_entra_testkit::in_child() {
        return;
    }
    assert_eq!(
        EnvCredential::choose().unwrap().variables_set(),
        [] as [&str; 0]
    );
    let (source, line) = from_env_and_its_line();
    assert!(line.contains("developer_tools"), "{line}");
    let token = source.get_token(SCOPE).await.unwrap();
    println!("child: upn {}", token.claims().unwrap().upn().unwrap());
}

/// `IDENTITY_ENDPOINT` without `IDENTITY_HEADER`: azure_identity would pass it over and ask the
/// instance metadata service; every managed-identity constructor refuses it before any request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_endpoint_without_its_header_builds_no_managed_identity() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let [endpoint, _header] = emulator.app_service_env();
    run_test_in_child(
        "from_env::endpoint_without_header_child",
        [endpoint],
        Duration::from_secs(60),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by an_identity_endpoint_without_its_header_builds_no_managed_identity"]
async fn endpoint_without_header_child() {
    if !postgres_entra_testkit::in_child() {
        return;
    }
    assert!(std::env::var_os("IDENTITY_HEADER").is_none());
    for error in [
        AzureTokenSource::managed_identity(None).unwrap_err(),
        AzureTokenSource::from_env().unwrap_err(),
    ] {
        let text = error.to_string();
        assert!(
            text.contains("IDENTITY_ENDPOINT is set without IDENTITY_HEADER"),
            "{text}"
        );
    }
}
