//! Black-box tests: the real `discotech` binary as the system resolver inside private network and
//! mount namespaces, with real clients (dig, getent, python) and real upstreams (dnsmasq).
//! Needs root and the packages the README's test command installs.

mod admin;
mod balance;
mod catch;
mod chaos;
mod dns;
mod dns_srv;
mod harness;
mod health;
mod hook;
mod observe;
mod packaging;
mod prefetch;
mod trust;
mod zk;
mod zookeeper;
