//! What only deadpool has: the user's own recycling method, which the adapter must keep.

use deadpool_postgres::{ManagerConfig, RecyclingMethod};
use postgres_entra_deadpool::{PoolOptions, create_pool};
use std::time::Duration;

use crate::pools::{Deadpool, PoolSpec};
use crate::{Suite, connector};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_users_recycling_method_still_runs() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let mut config = Deadpool::user_config(&PoolSpec::new(&emulator, connector(&emulator)).size(1));
    config.manager = Some(ManagerConfig {
        recycling_method: RecyclingMethod::Custom(
            "SET application_name = 'recycled by the user''s method'".into(),
        ),
    });
    let pool = create_pool(&config, &connector(&emulator), PoolOptions::new()).unwrap();

    let first = pool.get().await.unwrap();
    let name: String = first
        .query_one("show application_name", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(name, "recycled by the user's method");
    drop(first);
    let recycled = pool.get().await.unwrap();
    let name: String = recycled
        .query_one("show application_name", &[])
        .await
        .unwrap()
        .get(0);

    assert_eq!(name, "recycled by the user's method");
    assert_eq!(emulator.logins().len(), 1, "the same connection, recycled");
}
