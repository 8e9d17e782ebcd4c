use etcd_client::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower_lease_lock::{etcd::EtcdLocker, testing::EtcdServer, LockName, Locker};

async fn run<F, Fut>(label: &str, writes_per_op: f64, f: F)
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let n = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(3);
    let t0 = Instant::now();
    let mut ts = vec![];
    for w in 0..64 {
        let f = f.clone();
        let n = n.clone();
        ts.push(tokio::spawn(async move {
            while Instant::now() < end {
                f(w).await;
                n.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in ts {
        t.await.unwrap();
    }
    let ops = n.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64();
    println!(
        "{label:<40} {ops:>8.0} ops/s  {:>8.0} writes/s",
        ops * writes_per_op
    );
}

#[tokio::main(worker_threads = 2)]
async fn main() {
    let etcd = EtcdServer::start().await.unwrap();
    let c = etcd.client().await.unwrap();
    let lease = c.clone().lease_grant(60, None).await.unwrap().id();
    let locker = EtcdLocker::builder(etcd.client().await.unwrap())
        .namespace("p/")
        .build()
        .unwrap();
    locker.connect().await.unwrap();
    for _ in 0..2 {
        let cc = c.clone();
        run("plain put", 1.0, move |w| {
            let mut c = cc.clone();
            async move {
                c.put(format!("w/{w}"), "x", None).await.unwrap();
            }
        })
        .await;
        let cc = c.clone();
        run("raw put-if-absent txn + delete", 2.0, move |w| {
            let mut c = cc.clone();
            async move {
                let key = format!("r/{w}/k");
                c.txn(
                    Txn::new()
                        .when(vec![Compare::create_revision(
                            key.clone(),
                            CompareOp::Equal,
                            0,
                        )])
                        .and_then(vec![TxnOp::put(
                            key.clone(),
                            "",
                            Some(PutOptions::new().with_lease(lease)),
                        )]),
                )
                .await
                .unwrap();
                c.delete(key, None).await.unwrap();
            }
        })
        .await;
        let cc = c.clone();
        run("raw range txn + delete", 2.0, move |w| {
            let mut c = cc.clone();
            async move {
                let p = format!("g/{w}/");
                let e = format!("g/{w}0");
                let key = format!("g/{w}/k");
                c.txn(
                    Txn::new()
                        .when(vec![Compare::create_revision(
                            p.clone(),
                            CompareOp::Equal,
                            0,
                        )
                        .with_range(e.clone())])
                        .and_then(vec![TxnOp::put(
                            key.clone(),
                            "",
                            Some(PutOptions::new().with_lease(lease)),
                        )])
                        .or_else(vec![TxnOp::get(
                            p,
                            Some(
                                GetOptions::new()
                                    .with_range(e)
                                    .with_limit(1)
                                    .with_keys_only()
                                    .with_sort(SortTarget::Create, SortOrder::Ascend),
                            ),
                        )]),
                )
                .await
                .unwrap();
                c.delete(key, None).await.unwrap();
            }
        })
        .await;
        let l = locker.clone();
        run("ours try+release (awaited)", 2.0, move |w| {
            let l = l.clone();
            async move {
                let g = l
                    .try_acquire(&LockName::new(format!("t{w}")).unwrap())
                    .await
                    .unwrap();
                g.release().await.unwrap();
            }
        })
        .await;
        let l = locker.clone();
        run("ours try + drop (background release)", 2.0, move |w| {
            let l = l.clone();
            async move {
                let g = l
                    .try_acquire(&LockName::new(format!("d{w}")).unwrap())
                    .await
                    .unwrap();
                drop(g);
            }
        })
        .await;
    }
}
