//! Which token scope a server needs: one per Azure cloud and service, inferred from the host name.

use std::fmt;

use crate::error::Error;

/// An Azure cloud, or service, which decides the token audience of its PostgreSQL servers.
///
/// The scopes are Microsoft's: Azure Database for PostgreSQL takes tokens for
/// `https://ossrdbms-aad.database.windows.net` (and the US Government and China equivalents), Azure
/// Cosmos DB for PostgreSQL for `https://token.postgres.cosmos.azure.com` (Microsoft Learn, "Use
/// Microsoft Entra ID ... with Azure Cosmos DB for PostgreSQL").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Cloud {
    /// Azure Database for PostgreSQL, public cloud (`*.postgres.database.azure.com`).
    #[default]
    Public,
    /// Azure Database for PostgreSQL, Azure US Government (`*.postgres.database.usgovcloudapi.net`).
    UsGovernment,
    /// Azure Database for PostgreSQL, Azure operated by 21Vianet in China
    /// (`*.postgres.database.chinacloudapi.cn`).
    China,
    /// Azure Cosmos DB for PostgreSQL (`c-<cluster>.<id>.postgres.cosmos.azure.com`).
    CosmosDb,
}

const ALL: [Cloud; 4] = [
    Cloud::Public,
    Cloud::UsGovernment,
    Cloud::China,
    Cloud::CosmosDb,
];

impl Cloud {
    /// The scope to request tokens for.
    pub fn scope(self) -> &'static str {
        match self {
            Cloud::Public => "https://ossrdbms-aad.database.windows.net/.default",
            Cloud::UsGovernment => "https://ossrdbms-aad.database.usgovcloudapi.net/.default",
            Cloud::China => "https://ossrdbms-aad.database.chinacloudapi.cn/.default",
            Cloud::CosmosDb => "https://token.postgres.cosmos.azure.com/.default",
        }
    }

    /// The cloud a server host name belongs to (`*.postgres.database.<cloud suffix>`,
    /// `*.postgres.cosmos.azure.com`); any other name (a custom domain, `localhost`, an address)
    /// is the public cloud's.
    pub fn from_host(host: &str) -> Self {
        Self::from_server_name(host).unwrap_or_default()
    }

    /// The cloud or service of an Azure server name (`*.postgres.database.<cloud suffix>`,
    /// `*.postgres.cosmos.azure.com`), or `None` for any other name (a custom domain,
    /// `localhost`, an address).
    pub(crate) fn from_server_name(host: &str) -> Option<Self> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        ALL.into_iter()
            .find(|cloud| host.ends_with(cloud.server_suffix()))
    }

    /// The cloud whose scope `scope` is, if it is one of theirs.
    pub(crate) fn from_scope(scope: &str) -> Option<Self> {
        ALL.into_iter().find(|cloud| cloud.scope() == scope)
    }

    /// The domains whose servers take this cloud's tokens, the first its own (Microsoft Learn: "Node
    /// DNS names in Azure Cosmos DB for PostgreSQL" for `postgres.cosmos.azure.com` and the legacy
    /// names of clusters created before June 6, 2023; "Azure Private Endpoint private DNS zone
    /// values" for the `privatelink.` zones, which lie under these).
    pub(crate) fn token_domains(self) -> &'static [&'static str] {
        match self {
            Cloud::Public => &["postgres.database.azure.com"],
            Cloud::UsGovernment => &["postgres.database.usgovcloudapi.net"],
            Cloud::China => &["postgres.database.chinacloudapi.cn"],
            Cloud::CosmosDb => &["postgres.cosmos.azure.com", "postgres.database.azure.com"],
        }
    }

    fn server_suffix(self) -> &'static str {
        match self {
            Cloud::Public => ".postgres.database.azure.com",
            Cloud::UsGovernment => ".postgres.database.usgovcloudapi.net",
            Cloud::China => ".postgres.database.chinacloudapi.cn",
            Cloud::CosmosDb => ".postgres.cosmos.azure.com",
        }
    }
}

/// What the cloud or service is called: `Azure US Government`, `Azure Cosmos DB for PostgreSQL`.
impl fmt::Display for Cloud {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cloud::Public => "Azure public cloud",
            Cloud::UsGovernment => "Azure US Government",
            Cloud::China => "Azure China (21Vianet)",
            Cloud::CosmosDb => "Azure Cosmos DB for PostgreSQL",
        })
    }
}

/// The cloud of `host` when it is plainly in another cloud than the one `scope` is for (a token
/// sent there would be refused, and the refusal would not say why); `None` when they agree or
/// either side is not one of Azure's (a custom domain, `localhost`, a custom scope).
pub(crate) fn other_cloud(host: &str, scope: &str) -> Option<(Cloud, Cloud)> {
    match (Cloud::from_server_name(host), Cloud::from_scope(scope)) {
        (Some(server), Some(token)) if server != token => Some((server, token)),
        _ => None,
    }
}

/// Checks that `scope` is one `<resource>/.default` scope, as the client-credentials and
/// managed-identity flows require.
pub(crate) fn validate_scope(scope: &str) -> Result<(), Error> {
    let problem = if scope.is_empty() {
        Some("is empty")
    } else if scope.chars().any(char::is_whitespace) {
        Some("contains whitespace (exactly one scope is needed)")
    } else if !scope.ends_with("/.default") {
        Some("does not end in `/.default`")
    } else if !(scope.starts_with("https://") || scope.starts_with("api://"))
        || scope.len() <= "https:///.default".len()
    {
        Some("is not a `https://` or `api://` resource URI")
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(Error::config(format!(
            "token scope `{scope}` {problem}; use e.g. `{}` or leave it unset to infer it from the host",
            Cloud::Public.scope()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cloud_follows_the_host_suffix() {
        assert_eq!(
            Cloud::from_host("db1.postgres.database.azure.com"),
            Cloud::Public
        );
        assert_eq!(
            Cloud::from_host("db1.postgres.database.usgovcloudapi.net"),
            Cloud::UsGovernment
        );
        assert_eq!(
            Cloud::from_host("DB1.postgres.database.chinacloudapi.cn."),
            Cloud::China
        );
        assert_eq!(Cloud::from_host("localhost"), Cloud::Public);
        assert_eq!(
            Cloud::China.scope(),
            "https://ossrdbms-aad.database.chinacloudapi.cn/.default"
        );
        assert_eq!(
            Cloud::from_host("c-orders.abcdef0123456789.postgres.cosmos.azure.com"),
            Cloud::CosmosDb
        );
        assert_eq!(
            Cloud::CosmosDb.scope(),
            "https://token.postgres.cosmos.azure.com/.default"
        );
        assert_eq!(Cloud::UsGovernment.to_string(), "Azure US Government");
    }

    #[test]
    fn a_token_for_another_cloud_is_refused_only_when_both_sides_are_plain() {
        let gov = "db1.postgres.database.usgovcloudapi.net";
        assert_eq!(
            other_cloud(gov, Cloud::Public.scope()),
            Some((Cloud::UsGovernment, Cloud::Public))
        );
        assert_eq!(other_cloud(gov, Cloud::UsGovernment.scope()), None);
        // A custom domain, localhost, or a custom scope: nothing to compare.
        assert_eq!(other_cloud("db.example.com", Cloud::China.scope()), None);
        assert_eq!(other_cloud("localhost", Cloud::UsGovernment.scope()), None);
        assert_eq!(other_cloud(gov, "api://my-app/.default"), None);
        assert_eq!(
            Cloud::from_server_name("x.postgres.database.azure.com."),
            Some(Cloud::Public)
        );
        assert_eq!(Cloud::from_server_name("localhost"), None);
    }

    #[test]
    fn malformed_scopes_are_configuration_errors() {
        for bad in [
            "",
            " ",
            "https://ossrdbms-aad.database.windows.net",
            "a b/.default",
            "https:///.default",
            "ossrdbms/.default",
        ] {
            let error = validate_scope(bad).unwrap_err();
            assert!(matches!(error, Error::Config { .. }), "{bad:?}: {error}");
        }
        for good in [
            Cloud::Public.scope(),
            Cloud::UsGovernment.scope(),
            "api://my-app/.default",
        ] {
            validate_scope(good).unwrap();
        }
    }
}
