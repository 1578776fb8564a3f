//! The alert rules and the dashboard in `ops/`, tested with Prometheus's own tools: `promtool check
//! rules` and `promtool test rules`, `promtool check metrics` on what the `web_service` example
//! serves, every metric the rules and the dashboard query present in that output, and a real
//! Prometheus scraping the service through an identity-provider outage until the token alert
//! fires. Needs `promtool` and `prometheus` (`make test` installs Debian's `prometheus` package when
//! they are missing).

use postgres_entra::SessionOptions;
use postgres_entra_examples::web::{http_get, router};
use postgres_entra_examples::{Target, install_prometheus_metrics};
use postgres_entra_testkit::{Endpoint, Fault};
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn ops(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../ops")
        .join(path)
}

const RULES: &str = "prometheus/postgres-entra.rules.yml";
const DASHBOARD: &str = "grafana/postgres-entra.json";

/// A Prometheus tool, or a failure that says how to get it.
fn tool(name: &str) -> Command {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .any(|dir| dir.join(name).is_file());
    assert!(
        found,
        "`{name}` is not installed: `make deps` installs it (Debian: apt-get install prometheus)"
    );
    Command::new(name)
}

fn run(command: &mut Command, input: Option<&str>) -> (bool, String) {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    if let Some(input) = input {
        stdin.write_all(input.as_bytes()).unwrap();
    }
    drop(stdin);
    let output = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let (ok, said) = run(
        tool("promtool").arg("check").arg("rules").arg(ops(RULES)),
        None,
    );
    assert!(ok, "{said}");
    assert!(said.contains("SUCCESS: 6 rules found"), "{said}");
    let (ok, said) = run(
        tool("promtool").current_dir(ops("prometheus")).args([
            "test",
            "rules",
            "postgres-entra.rules.test.yml",
        ]),
        None,
    );
    assert!(ok, "{said}");
}

/// Every metric name the rules and the dashboard query: `postgres_entra_*` and `db_client_*`
/// identifiers in their expressions.
fn queried_metrics() -> BTreeSet<String> {
    let rules = std::fs::read_to_string(ops(RULES)).unwrap();
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(ops(DASHBOARD)).unwrap()).unwrap();
    let mut text = rules;
    for expr in dashboard_queries(&dashboard) {
        text.push('\n');
        text.push_str(&expr);
    }
    let mut names = BTreeSet::new();
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if (word.starts_with("postgres_entra_") || word.starts_with("db_client_"))
            && !is_label(word)
        {
            names.insert(word.to_owned());
        }
    }
    names
}

/// The label names the queries use, which share the metrics' prefixes.
fn is_label(word: &str) -> bool {
    [
        "postgres_entra_identity",
        "postgres_entra_scope",
        "postgres_entra_outcome",
        "postgres_entra_trigger",
        "db_client_connection_pool_name",
        "db_client_connection_state",
    ]
    .contains(&word)
}

/// The dashboard's panel queries, with its variables set as Grafana would for "All".
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .map(|target| {
            target["expr"]
                .as_str()
                .unwrap()
                .replace("$instance", ".*")
                .replace("$pool", ".*")
                .replace("$__rate_interval", "1m")
        })
        .collect()
}

/// A real Prometheus, stopped (and its files removed) when dropped.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Prometheus {
    /// Scrapes `127.0.0.1:target` every second and evaluates the rules every second.
    async fn start(target: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: web_service\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n",
                ops(RULES).display()
            ),
        )
        .unwrap();
        let port = free_port();
        let child = tool("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        postgres_entra_testkit::record_started(child.id(), "prometheus");
        let prometheus = Self {
            child,
            port,
            _dir: dir,
        };
        prometheus
            .until("Prometheus is ready", Duration::from_secs(30), async || {
                matches!(http_get(port, "/-/ready").await, Ok((200, _)))
            })
            .await;
        prometheus
    }

    /// `/api/v1/<path>`'s `data`, after checking the answer's status.
    async fn api(&self, path_and_query: &str) -> Value {
        let (status, body) = http_get(self.port, &format!("/api/v1/{path_and_query}"))
            .await
            .unwrap();
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(status, 200, "{path_and_query}: {body}");
        assert_eq!(answer["status"], "success", "{path_and_query}: {body}");
        answer["data"].clone()
    }

    async fn query(&self, expr: &str) -> Vec<Value> {
        let encoded =
            percent_encoding::utf8_percent_encode(expr, percent_encoding::NON_ALPHANUMERIC);
        self.api(&format!("query?query={encoded}"))
            .await
            .get("result")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    }

    /// The state of alert `name` (`pending`, `firing`), if it is active.
    async fn alert(&self, name: &str) -> Option<String> {
        let data = self.api("alerts").await;
        data["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["labels"]["alertname"] == name)
            .map(|a| a["state"].as_str().unwrap_or_default().to_owned())
    }

    /// Waits until `condition` holds, checking every 200 ms for at most `limit`.
    async fn until(&self, what: &str, limit: Duration, mut condition: impl AsyncFnMut() -> bool) {
        let started = Instant::now();
        while !condition().await {
            assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_metrics_pass_promtool_and_a_real_prometheus_fires_the_token_alert_in_an_outage()
 {
    // The web_service example as it runs (its router, its metrics pipeline, its deadpool pool
    // "web"), with a bb8 pool "jobs" and a pool whose role PostgreSQL does not know beside it on
    // the same connector, so that every metric has been recorded. Tokens live 20 s: under the
    // alert's 10 minutes from the start, as they are near the end of a real token's life.
    let registry = install_prometheus_metrics().unwrap();
    let target = tokio::task::spawn_blocking(|| Target::emulator(Duration::from_secs(20)))
        .await
        .unwrap()
        .unwrap();
    let emulator = target.emulator.as_ref().unwrap();
    let options = || SessionOptions::new().max_age(Duration::from_millis(300), Duration::ZERO);
    let web = postgres_entra_deadpool::create_pool(
        &target.deadpool_config(4),
        &target.connector,
        options().pool_name("web"),
    )
    .unwrap();
    let jobs_manager = postgres_entra_bb8::EntraConnectionManager::new(
        target.pg_config.clone(),
        &target.connector,
        options().pool_name("jobs"),
    )
    .unwrap();
    let jobs = bb8::Pool::builder()
        .max_size(2)
        .build(jobs_manager.clone())
        .await
        .unwrap();
    let _observed = jobs_manager.observe(&jobs);
    let mut wrong = target.deadpool_config(1);
    wrong.user = Some("no-such-role".to_owned());
    let wrong = postgres_entra_deadpool::create_pool(
        &wrong,
        &postgres_entra::EntraConnector::builder(target.source.clone())
            .tls_roots(postgres_entra::TlsRoots::CaPem(
                emulator.ca_pem().to_owned(),
            ))
            .build()
            .unwrap(),
        SessionOptions::new().pool_name("wrong"),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, router(web, registry)).await });

    // Traffic: checkouts on both pools, connections past their age retired, refused logins.
    for _ in 0..3 {
        let (status, body) = http_get(port, "/whoami").await.unwrap();
        assert_eq!(status, 200, "{body}");
        drop(jobs.get().await.unwrap());
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(wrong.get().await.is_err());

    // What the service serves passes promtool's own check, and holds every metric the rules and
    // the dashboard query.
    let (_, scraped) = http_get(port, "/metrics").await.unwrap();
    // promtool parses the whole scrape; its naming lint flags one name, which is OpenTelemetry's
    // semantic convention (`db.client.connection.count`, an up-down counter), kept as the
    // conventions name it.
    let (_, said) = run(tool("promtool").args(["check", "metrics"]), Some(&scraped));
    let problems: Vec<&str> = said.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        problems,
        [
            "db_client_connection_count non-histogram and non-summary metrics should not have \"_count\" suffix"
        ],
        "promtool check metrics: {said}"
    );
    let families: BTreeSet<&str> = scraped
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    let missing: Vec<String> = queried_metrics()
        .into_iter()
        .filter(|name| {
            // A histogram's series: its family's name and a suffix.
            let histogram = ["_bucket", "_count", "_sum"]
                .iter()
                .filter_map(|suffix| name.strip_suffix(suffix))
                .any(|family| families.contains(family));
            !families.contains(name.as_str()) && !histogram
        })
        .collect();
    assert!(
        missing.is_empty(),
        "queried but not served: {missing:?}; served: {families:?}"
    );

    // A real Prometheus scrapes it: every dashboard query is valid PromQL and, but for the checkout
    // timeouts (none happened), returns series; the token alert is quiet while the provider answers.
    let prometheus = Prometheus::start(port).await;
    prometheus
        .until(
            "the service is scraped",
            Duration::from_secs(20),
            async || {
                !prometheus
                    .query("postgres_entra_token_time_to_expiry_seconds")
                    .await
                    .is_empty()
            },
        )
        .await;
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(ops(DASHBOARD)).unwrap()).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for expr in dashboard_queries(&dashboard) {
        let result = prometheus.query(&expr).await;
        if !expr.contains("timeouts") && !expr.contains("histogram_quantile") {
            assert!(!result.is_empty(), "no series for {expr}");
        }
    }
    const ALERT: &str = "PostgresEntraTokenExpiringWhileRefreshFails";
    assert_eq!(prometheus.alert(ALERT).await, None);

    // The identity provider fails: refreshes fail, and the alert fires.
    emulator.set_fault(Endpoint::Token, Fault::ServerError);
    let outage = Instant::now();
    prometheus
        .until(
            "the token alert fires",
            Duration::from_secs(45),
            async || {
                let (status, _) = http_get(port, "/whoami").await.unwrap();
                let _ = status;
                prometheus.alert(ALERT).await.as_deref() == Some("firing")
            },
        )
        .await;
    println!(
        "{ALERT} firing {:.1} s after the outage began",
        outage.elapsed().as_secs_f64()
    );
    emulator.clear_fault(Endpoint::Token);
}
