//! A private PostgreSQL cluster: a copy of an initdb template in a temporary directory (in memory
//! where `/dev/shm` has room), a free loopback port, its own socket directory, TLS only for TCP,
//! started as an unprivileged user when we are root, and stopped and removed on drop, on panic,
//! and (through a watchdog) even when the owning process is killed.

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, User, geteuid};
use std::fs;
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Error;
use crate::tls::Pki;

/// Name of the bootstrap superuser, reachable only through the private socket directory.
pub(crate) const SUPERUSER: &str = "postgres";
/// Prefix of every emulator directory, so leftovers can be recognised.
pub const DIR_PREFIX: &str = "pg-entra-emu-";
/// A cluster's files under its directory: the socket directory, the CA certificate, the log.
const SOCKET_DIR: &str = "socket";
const CA_FILE: &str = "ca.crt";
const LOG_FILE: &str = "postgres.log";
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// The system user the server runs as when we are root (PostgreSQL refuses to run as root).
#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

fn run_as() -> Result<Option<RunAs>, Error> {
    if !geteuid().is_root() {
        return Ok(None);
    }
    let wanted = std::env::var("POSTGRES_ENTRA_PG_USER").unwrap_or_else(|_| "postgres".into());
    let user = User::from_name(&wanted)
        .ok()
        .flatten()
        .ok_or_else(|| {
            Error::Setup(format!(
                "running as root, and PostgreSQL refuses to run as root, but there is no user `{wanted}` to run it as; \
                 install the server package (`apt-get install postgresql`, which creates `postgres`) or set \
                 POSTGRES_ENTRA_PG_USER to an unprivileged user"
            ))
        })?;
    Ok(Some(RunAs {
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    }))
}

/// Finds a PostgreSQL server program on PATH or in Debian's versioned directories.
pub(crate) fn find_program(name: &str) -> Result<PathBuf, Error> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file());
    if let Some(path) = on_path {
        return Ok(path);
    }
    let mut versioned: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin").join(name))
        .filter(|p| p.is_file())
        .collect();
    versioned.sort();
    versioned.pop().ok_or_else(|| {
        Error::Setup(format!(
            "PostgreSQL server program `{name}` not found on PATH or under /usr/lib/postgresql; \
             install the server (Debian/Ubuntu: `apt-get install postgresql`)"
        ))
    })
}

/// Prefix of the initdb templates kept in the temporary directory between runs.
const TEMPLATE_PREFIX: &str = "pg-entra-template-";

/// A data directory made by `initdb` once per PostgreSQL installation and user, kept in the
/// temporary directory and copied for every cluster (a copy takes a fraction of an initdb's time
/// and CPU). Made under a temporary name and renamed into place, so concurrent test processes
/// never see a half-made one.
fn template(initdb: &Path, run_as: Option<RunAs>) -> Result<PathBuf, Error> {
    let stamp = fs::metadata(initdb)?
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let owner = run_as.map_or_else(|| nix::unistd::geteuid().as_raw(), |user| user.uid);
    let version = initdb
        .parent()
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .map_or_else(|| "pg".into(), |v| v.to_string_lossy().into_owned());
    let home = std::env::temp_dir().join(format!("{TEMPLATE_PREFIX}{version}-{stamp}-{owner}"));
    let data = home.join("data");
    if data.join("PG_VERSION").is_file() {
        return Ok(data);
    }
    let making = tempfile::Builder::new()
        .prefix(&format!("{TEMPLATE_PREFIX}making-"))
        .tempdir()?;
    give_to(making.path(), run_as, 0o755)?;
    let output = command(initdb, run_as)
        .arg("-D")
        .arg(making.path().join("data"))
        .args(["-U", SUPERUSER, "-A", "reject", "-E", "UTF8", "--locale=C"])
        .args(["--no-sync", "--no-instructions"])
        .stdin(Stdio::null())
        .output()?;
    if !output.status.success() {
        return Err(Error::Setup(format!(
            "initdb failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    // Another process may have made it meanwhile: then ours is dropped with `making`.
    let made = making.keep();
    if fs::rename(&made, &home).is_err() {
        let _ = fs::remove_dir_all(&made);
    }
    if data.join("PG_VERSION").is_file() {
        Ok(data)
    } else {
        Err(Error::Setup(format!(
            "the initdb template {} is missing its PG_VERSION",
            data.display()
        )))
    }
}

/// Where clusters are made: `/dev/shm` when it is there with room for several (copying the
/// template into memory takes 0.06 s, onto a disk 0.3-0.5 s of system time), else the temporary
/// directory.
fn cluster_parent() -> PathBuf {
    const SHM: &str = "/dev/shm";
    const ROOM: u64 = 1 << 30;
    match nix::sys::statvfs::statvfs(SHM) {
        Ok(fs) if fs.blocks_available().saturating_mul(fs.fragment_size()) >= ROOM => {
            PathBuf::from(SHM)
        }
        _ => std::env::temp_dir(),
    }
}

fn free_port() -> Result<u16, Error> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn command(program: &Path, run_as: Option<RunAs>) -> Command {
    let mut cmd = Command::new(program);
    if let Some(user) = run_as {
        cmd.uid(user.uid).gid(user.gid);
    }
    cmd.env_remove("PGPASSWORD").env("LC_ALL", "C");
    cmd
}

fn give_to(path: &Path, run_as: Option<RunAs>, mode: u32) -> Result<(), Error> {
    if let Some(user) = run_as {
        chown(path, Some(user.uid), Some(user.gid))?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn write_file(path: &Path, contents: &str, run_as: Option<RunAs>, mode: u32) -> Result<(), Error> {
    fs::File::create(path)?.write_all(contents.as_bytes())?;
    give_to(path, run_as, mode)
}

/// Where a running cluster's files are and how its superuser reaches it: read alike by the
/// cluster's owner and by the emulators that share it.
#[derive(Debug, Clone)]
pub(crate) struct Location {
    root: PathBuf,
    port: u16,
}

impl Location {
    /// The cluster in directory `root`, listening on `port`.
    pub(crate) fn new(root: PathBuf, port: u16) -> Self {
        Self { root, port }
    }

    pub(crate) fn directory(&self) -> &Path {
        &self.root
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    pub(crate) fn ca_path(&self) -> PathBuf {
        self.root.join(CA_FILE)
    }

    /// What the server wrote to its log so far.
    pub(crate) fn log(&self) -> String {
        fs::read_to_string(self.root.join(LOG_FILE)).unwrap_or_default()
    }

    /// The superuser's settings for `database`, over the cluster's private socket.
    pub(crate) fn superuser_config(&self, database: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(self.root.join(SOCKET_DIR))
            .port(self.port)
            .user(SUPERUSER)
            .dbname(database);
        config
    }
}

/// A running private cluster.
#[derive(Debug)]
pub(crate) struct Cluster {
    dir: Option<tempfile::TempDir>,
    run_as: Option<RunAs>,
    postgres: PathBuf,
    port: u16,
    server: Option<Child>,
    watchdog: Option<Child>,
}

impl Cluster {
    /// Creates and starts a cluster listening on `addresses`, whose TCP logins follow
    /// `tls_logins` (`hostssl` lines of `pg_hba.conf`); anything else over TCP is refused.
    pub(crate) fn start(pki: &Pki, addresses: &[IpAddr], tls_logins: &str) -> Result<Self, Error> {
        Self::start_with(pki, addresses, tls_logins, 300)
    }

    /// [`Cluster::start`] taking up to `max_connections` connections.
    pub(super) fn start_with(
        pki: &Pki,
        addresses: &[IpAddr],
        tls_logins: &str,
        max_connections: u32,
    ) -> Result<Self, Error> {
        let run_as = run_as()?;
        let initdb = find_program("initdb")?;
        let postgres = find_program("postgres")?;
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir_in(cluster_parent())?;
        let root = dir.path();
        give_to(root, run_as, 0o755)?;
        let socket_dir = root.join(SOCKET_DIR);
        fs::create_dir(&socket_dir)?;
        give_to(&socket_dir, run_as, 0o700)?;

        let data = root.join("data");
        let template = template(&initdb, run_as)?;
        let output = command(Path::new("cp"), run_as)
            .arg("-a")
            .arg(&template)
            .arg(&data)
            .stdin(Stdio::null())
            .output()?;
        if !output.status.success() {
            return Err(Error::Setup(format!(
                "copying the initdb template {} failed ({}): {}",
                template.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )));
        }

        write_file(&root.join(CA_FILE), &pki.ca_pem, run_as, 0o644)?;
        write_file(
            &data.join("server.crt"),
            &pki.server_cert_pem,
            run_as,
            0o644,
        )?;
        write_file(&data.join("server.key"), &pki.server_key_pem, run_as, 0o600)?;
        // TCP logins are TLS only and checked by the token verifier; a client without TLS is refused
        // before any password is asked. The superuser exists only behind the private socket.
        let hba = format!(
            "local     all {SUPERUSER} trust\n\
             local     all all     reject\n\
             hostnossl all all all reject\n\
             {tls_logins}"
        );
        write_file(&data.join("pg_hba.conf"), &hba, run_as, 0o600)?;
        // LOG level: a refused login's cause ("LDAP login failed ...: Invalid credentials" with
        // the token check's reason, or "Can't contact LDAP server") is written only at LOG. No
        // connection or statement is logged, and no password is at any level.
        let conf = format!(
            "\n# postgres-entra emulator\n\
             listen_addresses = '{}'\n\
             unix_socket_directories = '{}'\n\
             ssl = on\n\
             ssl_cert_file = 'server.crt'\n\
             ssl_key_file = 'server.key'\n\
             ssl_min_protocol_version = 'TLSv1.2'\n\
             max_connections = {}\n\
             shared_buffers = 32MB\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             log_min_messages = log\n\
             logging_collector = off\n",
            addresses
                .iter()
                .map(IpAddr::to_string)
                .collect::<Vec<_>>()
                .join(","),
            socket_dir.display(),
            max_connections,
        );
        fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))?
            .write_all(conf.as_bytes())?;

        let mut cluster = Self {
            dir: Some(dir),
            run_as,
            postgres,
            port: 0,
            server: None,
            watchdog: None,
        };
        cluster.start_server(None)?;
        Ok(cluster)
    }

    fn root(&self) -> &Path {
        self.dir.as_ref().expect("cluster directory").path()
    }

    /// Where the running cluster is.
    pub(crate) fn location(&self) -> Location {
        Location::new(self.root().to_owned(), self.port)
    }

    pub(crate) fn directory(&self) -> &Path {
        self.root()
    }

    /// Process id of the postmaster, while it runs.
    pub(crate) fn server_pid(&self) -> Option<u32> {
        self.server.as_ref().map(Child::id)
    }

    /// Starts the server; on a fresh cluster on a free port, after a restart on the same port.
    pub(crate) fn start_server(&mut self, port: Option<u16>) -> Result<(), Error> {
        let mut last_error = None;
        for _ in 0..5 {
            let port = match port {
                Some(p) => p,
                None => free_port()?,
            };
            match self.spawn_server(port) {
                Ok(()) => return Ok(()),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    fn spawn_server(&mut self, port: u16) -> Result<(), Error> {
        let data = self.root().join("data");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root().join(LOG_FILE))?;
        let mut child = command(&self.postgres, self.run_as)
            .arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        crate::processes::record_started(child.id(), "postgres");
        let pid_file = data.join("postmaster.pid");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                return Err(Error::Setup(format!(
                    "postgres exited during start-up ({status}); its log:\n{}",
                    self.location().log()
                )));
            }
            // The postmaster writes "ready" as the last line of its pid file once it accepts connections.
            let ready = fs::read_to_string(&pid_file)
                .map(|s| s.lines().nth(7).map(str::trim) == Some("ready"))
                .unwrap_or(false);
            if ready {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Setup(format!(
                    "postgres did not become ready within {START_TIMEOUT:?}; its log:\n{}",
                    self.location().log()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.watchdog = Some(spawn_watchdog(child.id(), self.root())?);
        self.server = Some(child);
        self.port = port;
        Ok(())
    }

    /// Stops the server (fast shutdown: clients are disconnected), keeping the cluster's files.
    pub(crate) fn stop_server(&mut self) {
        if let Some(mut child) = self.server.take() {
            let pid = Pid::from_raw(child.id() as i32);
            let _ = kill(pid, Signal::SIGINT);
            let deadline = Instant::now() + STOP_TIMEOUT;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }

    /// Stops and starts the server on the same port.
    pub(crate) fn restart_server(&mut self) -> Result<(), Error> {
        self.stop_server();
        self.start_server(Some(self.port))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_server();
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
    }
}

/// A detached shell that outlives us only to clean up: if this process dies without dropping the
/// cluster (SIGKILL, abort), it stops the server and removes the directory. It polls once a second
/// and exits by itself as soon as either process is gone.
fn spawn_watchdog(server_pid: u32, dir: &Path) -> Result<Child, Error> {
    const SCRIPT: &str = r#"
owner=$1; server=$2; dir=$3
while kill -0 "$owner" 2>/dev/null; do
  kill -0 "$server" 2>/dev/null || exit 0
  sleep 1
done
kill -QUIT "$server" 2>/dev/null
i=0
while kill -0 "$server" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.2; i=$((i+1)); done
kill -KILL "$server" 2>/dev/null
rm -rf "$dir"
"#;
    Ok(Command::new("sh")
        .arg("-c")
        .arg(SCRIPT)
        .arg("postgres-entra-watchdog")
        .arg(std::process::id().to_string())
        .arg(server_pid.to_string())
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()?)
}
