//! Where a token may go. An Entra ID token for Azure Database for PostgreSQL is not bound to a
//! server: every server of the tenant on which the principal has a role accepts it. Valid TLS
//! proves only that a server owns the name it was asked for, and the trusted roots (DigiCert Global
//! Root G2 among them) sign certificates for anyone's domain. So before a token is fetched for a
//! host, the host must be one of the Azure Database for PostgreSQL names of the token's cloud,
//! loopback, or a host the user allowed explicitly.
//!
//! Host strings are parsed with the grammar TLS verification uses (rustls's `ServerName`: a DNS
//! name of letters, digits, `-` and `_`, or an IP literal), never searched for bad characters: a
//! Unix socket path, a Linux abstract socket (`@name`), a host list, a URL fragment or a name with
//! spaces is refused.

use rustls::pki_types::ServerName;
use std::fmt;
use std::net::IpAddr;

use crate::error::Error;
use crate::scope::Cloud;

/// The environment variable the `postgres-entra` tool (and
/// [`EntraConnectorBuilder::allow_hosts_from_env`](crate::EntraConnectorBuilder::allow_hosts_from_env))
/// reads allowed hosts from: patterns separated by commas or whitespace.
pub const ALLOWED_HOSTS_VARIABLE: &str = "POSTGRES_ENTRA_ALLOWED_HOSTS";

/// One entry of an allow-list: a host name or IP address, or every name under a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    /// This name (lower case, no trailing dot) or address.
    Exact(String),
    /// Every name ending in `.` + this domain (lower case, no trailing dot).
    Under(String),
}

/// Hosts a token may be sent to beyond the Azure Database for PostgreSQL names of its cloud and
/// loopback: Docker or CI host names, self-hosted poolers, custom domains, clouds this library does
/// not know. Each entry is a host name (`db.internal`), an IP address (`fd00::5`) or
/// every name under a domain (`*.corp.example.com`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct AllowedHosts {
    patterns: Vec<Pattern>,
}

/// A host string as TLS will verify it: lower case, without a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ParsedHost {
    /// A DNS name.
    Name(String),
    /// An IP literal.
    Address(IpAddr),
}

impl fmt::Display for ParsedHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParsedHost::Name(name) => f.write_str(name),
            ParsedHost::Address(address) => write!(f, "{address}"),
        }
    }
}

/// `host` parsed as TLS verification parses it, or a configuration error saying why it cannot
/// carry a token.
pub(crate) fn parse_host(host: &str) -> Result<ParsedHost, Error> {
    let refuse = |why: &str| {
        Error::config(format!(
            "the host `{}` {why}; token login needs one TCP host name or IP address, verified by TLS",
            host.escape_debug()
        ))
    };
    if host.is_empty() {
        return Err(refuse("is empty"));
    }
    if host.starts_with('/') || host.starts_with('@') {
        return Err(refuse(
            "is a Unix socket (a path, or `@` for Linux's abstract sockets), which cannot carry TLS",
        ));
    }
    if host.contains(',') {
        return Err(refuse(
            "is a list of hosts; name each server in its own setting (tokio-postgres: one `host` per server)",
        ));
    }
    match ServerName::try_from(host) {
        Ok(ServerName::DnsName(name)) => Ok(ParsedHost::Name(
            name.as_ref().trim_end_matches('.').to_ascii_lowercase(),
        )),
        Ok(ServerName::IpAddress(address)) => Ok(ParsedHost::Address(IpAddr::from(address))),
        Ok(_) => Err(refuse("is neither a DNS name nor an IP address")),
        Err(_) => Err(refuse(
            "is neither a DNS name (letters, digits, `-`, `_` and dots) nor an IP address",
        )),
    }
}

impl ParsedHost {
    /// Whether connects to this host stay on this machine: a loopback address, or `localhost`
    /// (RFC 6761) when it is not reached at another `address`.
    fn is_loopback(&self, address: Option<IpAddr>) -> bool {
        let address_loopback = address.is_none_or(|a| a.is_loopback());
        match self {
            ParsedHost::Address(a) => a.is_loopback() && address_loopback,
            ParsedHost::Name(name) => {
                (name == "localhost" || name.ends_with(".localhost")) && address_loopback
            }
        }
    }
}

impl AllowedHosts {
    /// Adds `pattern`: a host name, an IP address, or `*.domain`.
    pub(crate) fn add(&mut self, pattern: &str) -> Result<(), Error> {
        let pattern = pattern.trim();
        let bad = |why: &str| {
            Error::config(format!(
                "allowed host `{}` {why}: give a host name (db.internal), an IP address (fd00::5) or every name under a domain (*.corp.example.com)",
                pattern.escape_debug()
            ))
        };
        let entry = match pattern.strip_prefix("*.") {
            Some(domain) => match parse_host(domain) {
                Ok(ParsedHost::Name(domain)) if domain.contains('.') => Pattern::Under(domain),
                Ok(ParsedHost::Name(_)) => {
                    return Err(bad(
                        "would allow a whole top-level domain: name the domain you own",
                    ));
                }
                _ => return Err(bad("is not `*.` followed by a domain name")),
            },
            None if pattern.contains('*') => {
                return Err(bad(
                    "has a `*` that is not a leading `*.`; a bare `*` would send tokens anywhere",
                ));
            }
            None => match parse_host(pattern) {
                Ok(host) => Pattern::Exact(host.to_string()),
                Err(_) => return Err(bad("is not a host name or IP address")),
            },
        };
        if !self.patterns.contains(&entry) {
            self.patterns.push(entry);
        }
        Ok(())
    }

    /// Adds every pattern of `list`, separated by commas or whitespace (an environment variable's
    /// value).
    pub(crate) fn add_list(&mut self, list: &str) -> Result<(), Error> {
        list.split(|c: char| c == ',' || c.is_whitespace())
            .filter(|p| !p.is_empty())
            .try_for_each(|pattern| self.add(pattern))
    }

    fn allows(&self, host: &ParsedHost) -> bool {
        let text = host.to_string();
        self.patterns.iter().any(|pattern| match pattern {
            Pattern::Exact(exact) => *exact == text,
            Pattern::Under(domain) => {
                matches!(host, ParsedHost::Name(_)) && is_under(&text, domain)
            }
        })
    }
}

/// Whether `name` is a name under `domain` (not `domain` itself).
fn is_under(name: &str, domain: &str) -> bool {
    name.len() > domain.len() + 1
        && name.ends_with(domain)
        && name.as_bytes()[name.len() - domain.len() - 1] == b'.'
}

/// Checks that a token for `scope` may be sent to `host` (reached at `address`, when given):
/// `host` must parse as a DNS name or IP literal and, for the Azure Database for PostgreSQL
/// scopes, be a server name of the scope's cloud, loopback, or allowed by `allowed`. A custom scope
/// (e.g. an `api://` gateway's) is the user's explicit choice and checks the grammar only.
pub(crate) fn check_host(
    host: &str,
    address: Option<IpAddr>,
    scope: &str,
    allowed: &AllowedHosts,
) -> Result<(), Error> {
    let parsed = parse_host(host)?;
    let Some(cloud) = Cloud::from_scope(scope) else {
        return Ok(());
    };
    if parsed.is_loopback(address) || allowed.allows(&parsed) {
        return Ok(());
    }
    if let ParsedHost::Name(name) = &parsed
        && cloud.token_domains().iter().any(|d| is_under(name, d))
    {
        return Ok(());
    }
    let domains = cloud
        .token_domains()
        .iter()
        .map(|d| format!("*.{d}"))
        .collect::<Vec<_>>()
        .join(", ");
    Err(Error::config(format!(
        "no token was requested for `{parsed}`: it is not a server of {cloud} ({domains}), nor loopback, nor an allowed host. A token is accepted by every server of your tenant, so it goes only to hosts you named: if `{parsed}` is yours (a Docker or CI host name, a self-hosted pooler, a custom domain, a cloud this library does not know), allow it with `EntraConnectorBuilder::allow_host(\"{parsed}\")` (or {ALLOWED_HOSTS_VARIABLE}=\"{parsed}\" for the postgres-entra tool), or correct the host name"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PUBLIC: &str = "https://ossrdbms-aad.database.windows.net/.default";

    /// An IPv4 address that is not loopback, spelled so that no source line names one (the
    /// sources name only loopback addresses): only ever parsed, never reached.
    fn v4(octets: [u8; 4]) -> String {
        octets.map(|o| o.to_string()).join(".")
    }

    fn allowed(patterns: &[&str]) -> AllowedHosts {
        let mut allowed = AllowedHosts::default();
        for pattern in patterns {
            allowed.add(pattern).unwrap();
        }
        allowed
    }

    #[test]
    fn azure_names_of_the_tokens_cloud_and_loopback_pass_and_nothing_else() {
        let none = AllowedHosts::default();
        for host in [
            "orders.postgres.database.azure.com",
            "ORDERS.Postgres.Database.Azure.com.",
            "orders.privatelink.postgres.database.azure.com",
            "localhost",
            "db.localhost",
            "127.0.0.1",
            "127.8.9.10",
            "::1",
        ] {
            check_host(host, None, PUBLIC, &none).unwrap_or_else(|e| panic!("{host}: {e}"));
        }
        for host in [
            "orders.postgres.database.azure.com.evil.example",
            "postgres.database.azure.com",
            "evilpostgres.database.azure.com",
            "orders.postgres.database.usgovcloudapi.net",
            "c-x.abc.postgres.cosmos.azure.com",
            "db.example.com",
            "localhost.example.com",
        ]
        .into_iter()
        .map(str::to_owned)
        .chain([v4([10, 0, 0, 5])])
        {
            let error = check_host(&host, None, PUBLIC, &none).unwrap_err();
            assert!(matches!(error, Error::Config { .. }), "{host}");
            let text = error.to_string();
            assert!(text.contains("allow_host"), "{text}");
            assert!(text.contains("*.postgres.database.azure.com"), "{text}");
        }
        // localhost reached at another address is not loopback.
        let away: IpAddr = v4([203, 0, 113, 5]).parse().unwrap();
        assert!(check_host("localhost", Some(away), PUBLIC, &none).is_err());
        let home: IpAddr = "127.0.0.1".parse().unwrap();
        check_host("localhost", Some(home), PUBLIC, &none).unwrap();
        // An Azure name reached at a private endpoint's address is still that server.
        check_host(
            "orders.postgres.database.azure.com",
            Some(away),
            PUBLIC,
            &none,
        )
        .unwrap();
    }

    #[test]
    fn each_cloud_has_its_own_domains_and_cosmos_keeps_its_legacy_one() {
        let none = AllowedHosts::default();
        let gov = Cloud::UsGovernment.scope();
        check_host("a.postgres.database.usgovcloudapi.net", None, gov, &none).unwrap();
        assert!(check_host("a.postgres.database.azure.com", None, gov, &none).is_err());
        let china = Cloud::China.scope();
        check_host("a.postgres.database.chinacloudapi.cn", None, china, &none).unwrap();
        let cosmos = Cloud::CosmosDb.scope();
        check_host("c-x.1234.postgres.cosmos.azure.com", None, cosmos, &none).unwrap();
        check_host("c.x.postgres.database.azure.com", None, cosmos, &none).unwrap();
        assert!(check_host("a.postgres.database.chinacloudapi.cn", None, cosmos, &none).is_err());
    }

    #[test]
    fn a_custom_scope_checks_the_grammar_only() {
        let none = AllowedHosts::default();
        check_host(
            "gateway.example.com",
            None,
            "api://my-gateway/.default",
            &none,
        )
        .unwrap();
        assert!(check_host("@trap", None, "api://my-gateway/.default", &none).is_err());
    }

    #[test]
    fn anything_but_one_dns_name_or_ip_literal_is_refused_whatever_the_scope() {
        for host in [
            "",
            "@name",
            "/var/run/postgresql",
            "a,b",
            "127.0.0.1?port=1&sslmode=disable#",
            "db example",
            "db\nexample",
            "db:5432",
            "[::1]",
            "fe80::1%eth0",
            "-db.example.com",
            "exa%6dple.com",
            "db.example.com/",
            "bücher.example",
            "user@host",
            "host\0",
        ] {
            let error = parse_host(host).unwrap_err();
            assert!(matches!(error, Error::Config { .. }), "{host:?}");
        }
        assert_eq!(
            parse_host("DB.Example.COM.").unwrap(),
            ParsedHost::Name("db.example.com".into())
        );
        assert_eq!(
            parse_host("::1").unwrap(),
            ParsedHost::Address("::1".parse().unwrap())
        );
    }

    #[test]
    fn the_allow_list_takes_names_addresses_and_domains_and_refuses_wildcards_that_allow_too_much()
    {
        let (listed, other) = (v4([10, 1, 2, 3]), v4([10, 1, 2, 4]));
        let list = allowed(&["db.internal", &listed, "*.corp.example.com", "FD00::5"]);
        for host in [
            "db.internal",
            "DB.internal.",
            &listed,
            "a.corp.example.com",
            "fd00::5",
        ] {
            check_host(host, None, PUBLIC, &list).unwrap_or_else(|e| panic!("{host}: {e}"));
        }
        for host in [
            "corp.example.com",
            "x.db.internal",
            &other,
            "evilcorp.example.com",
        ] {
            assert!(check_host(host, None, PUBLIC, &list).is_err(), "{host}");
        }
        for bad in [
            "*",
            "*.com",
            "db.*.example",
            "*.@x",
            "a b",
            "*.",
            "**.example.com",
        ] {
            let error = AllowedHosts::default().add(bad).unwrap_err();
            assert!(error.to_string().contains("allowed host"), "{bad}: {error}");
        }
        let mut env = AllowedHosts::default();
        env.add_list(&format!(" db.internal, *.corp.example.com  {listed} ,"))
            .unwrap();
        assert_eq!(
            env,
            allowed(&["db.internal", "*.corp.example.com", &listed])
        );
    }
}
