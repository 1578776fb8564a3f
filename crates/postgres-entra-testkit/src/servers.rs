//! The Azure servers the emulator plays at once. Each has an Azure-shaped name, which the server
//! certificate carries, is reached at its own loopback address (clients pass it as `hostaddr`, so
//! no DNS or /etc/hosts change is needed), and accepts only tokens for its own audience, as Azure
//! does.
//!
//! PostgreSQL's pg_hba matches the client's address, not the address it dialled, and a loopback
//! client's source is always 127.0.0.1. So each name other than the public one has a forwarder on
//! its own address that connects to PostgreSQL *from* that address; pg_hba sends each source
//! address's logins to the LDAP responder under the server's own DN suffix. TLS passes through the
//! forwarder untouched.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use tokio::net::{TcpListener, TcpSocket};

use crate::TOKEN_AUDIENCE;

/// Accepts connections on `listener` and forwards each to `target` from `source`, so that the
/// server sees the client at `source`.
pub(crate) async fn forward(listener: TcpListener, source: IpAddr, target: SocketAddr) {
    while let Ok((mut client, _)) = listener.accept().await {
        tokio::spawn(async move {
            let Ok(socket) = TcpSocket::new_v4() else {
                return;
            };
            if socket.bind(SocketAddr::new(source, 0)).is_err() {
                return;
            }
            let Ok(mut server) = socket.connect(target).await else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        });
    }
}

/// An Azure PostgreSQL service in one cloud, as the emulator plays it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AzureServer {
    /// Azure Database for PostgreSQL, public cloud (also `localhost` and `::1`).
    Public,
    /// Azure Database for PostgreSQL, Azure US Government.
    UsGovernment,
    /// Azure Database for PostgreSQL, Azure China (21Vianet).
    China,
    /// Azure Cosmos DB for PostgreSQL.
    CosmosDb,
}

impl AzureServer {
    /// Every server the emulator plays.
    pub const ALL: [AzureServer; 4] = [
        AzureServer::Public,
        AzureServer::UsGovernment,
        AzureServer::China,
        AzureServer::CosmosDb,
    ];

    /// The server's name, as Azure would give it.
    pub fn host_name(self) -> &'static str {
        match self {
            AzureServer::Public => "emulated.postgres.database.azure.com",
            AzureServer::UsGovernment => "emulated.postgres.database.usgovcloudapi.net",
            AzureServer::China => "emulated.postgres.database.chinacloudapi.cn",
            AzureServer::CosmosDb => "c-emulated.0123456789abcdef.postgres.cosmos.azure.com",
        }
    }

    /// The loopback address the server listens on for this name.
    pub fn address(self) -> IpAddr {
        let last = match self {
            AzureServer::Public => 1,
            AzureServer::UsGovernment => 2,
            AzureServer::China => 3,
            AzureServer::CosmosDb => 4,
        };
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
    }

    /// The token audience the server accepts (Microsoft's resource for the service and cloud).
    pub fn audience(self) -> &'static str {
        match self {
            AzureServer::Public => TOKEN_AUDIENCE,
            AzureServer::UsGovernment => "https://ossrdbms-aad.database.usgovcloudapi.net",
            AzureServer::China => "https://ossrdbms-aad.database.chinacloudapi.cn",
            AzureServer::CosmosDb => "https://token.postgres.cosmos.azure.com",
        }
    }

    /// The LDAP organisational unit its logins are bound under.
    pub(crate) fn ldap_unit(self) -> &'static str {
        match self {
            AzureServer::Public => "public",
            AzureServer::UsGovernment => "usgov",
            AzureServer::China => "china",
            AzureServer::CosmosDb => "cosmos",
        }
    }

    pub(crate) fn from_ldap_unit(unit: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.ldap_unit() == unit)
    }
}
