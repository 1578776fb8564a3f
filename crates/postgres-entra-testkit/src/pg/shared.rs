//! One cluster for many emulators. Clusters are not cheap (a copy of the initdb template, a start
//! and a stop: about a quarter of a second each); databases and roles are. A test run started by
//! `postgres-entra-shared-cluster` gets one cluster, named to every emulator it starts by
//! [`SharedCluster::ENV`]. The cluster has a fixed number of slots, each a database and an LDAP
//! port that `pg_hba.conf` sends that database's logins to. An emulator takes a free slot by
//! binding its port for its token check (the bind is the claim: the kernel lets one listener
//! have it), and ends the sessions its slot's last emulator left.
//!
//! Nothing that signals every backend happens while tests run: `pg_hba.conf` never changes (no
//! reload) and the databases are made when the cluster starts and never dropped (`DROP DATABASE`
//! signals every backend to release its files). A backend signalled in the middle of its LDAP
//! bind fails the login ("Can't contact LDAP server"), which another test would see as a refused
//! token. Emulators that stop, kill or reconfigure the server ask for a private cluster instead
//! ([`crate::EmulatorBuilder::private_cluster`]), and so does every emulator once all slots are
//! taken.

use std::fs;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use super::cluster::{Cluster, Location};
use crate::issuer::SigningKey;
use crate::tls::Pki;
use crate::{Error, ldap};

/// Emulators that can use the cluster at once (nextest runs six tests at a time; a few start
/// more than one emulator).
const SLOTS: u16 = 24;
/// Connections the shared cluster takes: every concurrent test's pools at once.
const MAX_CONNECTIONS: u32 = 1000;
/// The file that names the cluster's port and its slots' LDAP ports, in its directory.
const PORTS_FILE: &str = "ports";
/// The files holding the run's token-signing keys (PKCS#8 DER): generating an RSA key takes
/// about 0.2 s of CPU, twice for every emulator otherwise.
const KEY_FILES: [&str; 2] = ["signing-key.der", "rogue-key.der"];

/// The database of slot `slot`.
fn slot_database(slot: usize) -> String {
    format!("emulator_{slot}")
}

/// A cluster shared by the emulators of a test run; stopped and removed on drop (or, if this
/// process is killed, by the cluster's watchdog).
#[derive(Debug)]
pub struct SharedCluster {
    cluster: Cluster,
}

impl SharedCluster {
    /// The environment variable that names a shared cluster's directory to the emulators.
    pub const ENV: &'static str = "POSTGRES_ENTRA_SHARED_CLUSTER";

    /// Starts a cluster whose TCP logins, TLS only, go to the token check of whichever emulator
    /// holds their database's slot.
    pub fn start() -> Result<Self, Error> {
        let ports = slot_ports()?;
        let hba: String = ports
            .iter()
            .enumerate()
            .flat_map(|(slot, port)| ldap::hba_lines(&slot_database(slot), *port))
            .map(|line| line + "\n")
            .collect();
        let pki = Pki::generate()?;
        let addresses = [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ];
        let cluster = Cluster::start_with(&pki, &addresses, &hba, MAX_CONNECTIONS)?;
        create_databases(&cluster, ports.len())?;
        let listing: Vec<String> = std::iter::once(cluster.location().port())
            .chain(ports)
            .map(|port| port.to_string())
            .collect();
        for name in KEY_FILES {
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(cluster.directory().join(name))?
                .write_all(&SigningKey::generate_pkcs8()?)?;
        }
        // Written last: its presence says the cluster is ready.
        fs::write(cluster.directory().join(PORTS_FILE), listing.join("\n"))?;
        Ok(Self { cluster })
    }

    /// The directory to name in [`SharedCluster::ENV`].
    pub fn directory(&self) -> &Path {
        self.cluster.directory()
    }
}

/// Creates the slots' databases.
fn create_databases(cluster: &Cluster, slots: usize) -> Result<(), Error> {
    let config = cluster.location().superuser_config("postgres");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        for slot in 0..slots {
            client
                .batch_execute(&format!("CREATE DATABASE {}", slot_database(slot)))
                .await?;
        }
        Ok(())
    })
}

/// LDAP ports for the slots: free now, and below the kernel's range for ephemeral ports, so that
/// no listener bound to port 0 (every other one in the emulator) can take one.
fn slot_ports() -> Result<Vec<u16>, Error> {
    let ephemeral_low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let candidates = 10_000..ephemeral_low;
    let start = candidates.start + (std::process::id() % 8_000) as u16;
    let ports: Vec<u16> = (start..candidates.end)
        .chain(candidates.start..start)
        .filter(|port| TcpListener::bind((Ipv4Addr::LOCALHOST, *port)).is_ok())
        .take(SLOTS.into())
        .collect();
    if ports.len() < SLOTS.into() {
        return Err(Error::Setup(format!(
            "only {} free loopback ports below {ephemeral_low} for the shared cluster's {SLOTS} slots",
            ports.len()
        )));
    }
    Ok(ports)
}

/// The shared cluster named by the environment, as an emulator sees it.
#[derive(Debug, Clone)]
pub(crate) struct Attached {
    location: Location,
    slot_ports: Vec<u16>,
}

impl Attached {
    /// The cluster [`SharedCluster::ENV`] names, if any.
    pub(crate) fn from_env() -> Result<Option<Self>, Error> {
        let Some(root) = std::env::var_os(SharedCluster::ENV).map(PathBuf::from) else {
            return Ok(None);
        };
        let ports: Option<Vec<u16>> = fs::read_to_string(root.join(PORTS_FILE))
            .ok()
            .and_then(|text| text.lines().map(|p| p.trim().parse().ok()).collect());
        let Some([port, slot_ports @ ..]) = ports.as_deref() else {
            return Err(Error::Setup(format!(
                "{} names {}, which holds no running shared cluster",
                SharedCluster::ENV,
                root.display()
            )));
        };
        Ok(Some(Self {
            location: Location::new(root, *port),
            slot_ports: slot_ports.to_vec(),
        }))
    }

    /// Takes a free slot, if there is one: its database's name and the listener for its logins'
    /// LDAP binds, which holds the slot until it is closed.
    pub(crate) fn claim(&self) -> Option<(String, TcpListener)> {
        self.slot_ports.iter().enumerate().find_map(|(slot, port)| {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, *port)).ok()?;
            Some((slot_database(slot), listener))
        })
    }

    pub(crate) fn location(&self) -> &Location {
        &self.location
    }

    /// The run's token-signing key and the key it never publishes, which every emulator on the
    /// cluster shares.
    pub(crate) fn signing_keys(&self) -> Result<(SigningKey, SigningKey), Error> {
        let [key, rogue] = KEY_FILES.map(|name| fs::read(self.location.directory().join(name)));
        Ok((
            SigningKey::from_pkcs8(&key?)?,
            SigningKey::from_pkcs8(&rogue?)?,
        ))
    }
}
