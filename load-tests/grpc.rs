//! `grpc`: GetRecordStatus latency and WatchOutcomes keeping up with the pipeline.
//!
//! The pipeline runs batched upserts with the status topic on, once without a watcher and
//! once with one watching every outcome (admin token), each on a fresh broker and
//! sandbox; the watcher's count is compared with the statuses written. Then
//! GetRecordStatus is asked for random records of the run, one call at a time, and its
//! latency percentiles are reported.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crm_sync::config::{GrpcConfig, Secret};
use crm_sync::grpc::{client, pb};
use crm_sync::sandbox::kafka::tools;
use rand::Rng;

use super::{config, print_run, run_pipeline, runtime, start_sandboxes, stream, RunFigures, HEADER, TOPIC};

const TOKEN: &str = "load-admin-token";

pub fn run(events: usize) {
    let partitions = 12;
    let messages = stream(events, 1, false);
    println!("\n### grpc: WatchOutcomes beside the pipeline, then GetRecordStatus latency\n\n{HEADER}");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut figures: Vec<RunFigures> = Vec::new();
    let mut last = None;
    for (i, (name, watching)) in [
        ("warm-up, not compared", false),
        ("status on, no watcher", false),
        ("status on, a watcher of every outcome", true),
        ("status on, no watcher again", false),
    ]
    .into_iter()
    .enumerate()
    {
        let s = start_sandboxes(partitions, 0);
        runtime()
            .block_on(tools::produce(&s.bootstrap, TOPIC, &messages))
            .expect("produce");
        let mut config = config(&s, &format!("load-grpc-{i}"), true, 1e6, 32, 200);
        config.kafka.status_topic = Some("load-status".into());
        config.grpc = Some(GrpcConfig {
            addr: "127.0.0.1:0".into(),
            admin_token: Some(Secret::new(TOKEN)),
            tenant_tokens: Default::default(),
            status_capacity: events.max(1),
            tls_cert_path: None,
            tls_key_path: None,
        });
        // The gRPC server starts with the service: the watcher connects to a member of
        // a first service of the same broker, started for it.
        let seen = Arc::new(AtomicU64::new(0));
        let missed = Arc::new(AtomicU64::new(0));
        let watcher = watching.then(|| {
            let mut watch_config = config.clone();
            watch_config.kafka.group_id = format!("load-grpc-watch-{i}");
            watch_config.kafka.input_topics = vec!["load-watch-none".into()];
            let member = crm_sync::pipeline::start(watch_config).expect("watch member");
            let addr = member.grpc_addr().unwrap().to_string();
            let counter = seen.clone();
            let lost = missed.clone();
            let task = rt.spawn(async move {
                let (mut c, _) = client::connect_as(&addr, TOKEN).await.expect("connect");
                let mut stream = c
                    .watch_outcomes(pb::WatchOutcomesRequest::default())
                    .await
                    .expect("watch")
                    .into_inner();
                while let Ok(Some(m)) = stream.message().await {
                    match m.kind {
                        Some(pb::watch_outcomes_response::Kind::Outcome(_)) => {
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(pb::watch_outcomes_response::Kind::Missed(n)) => {
                            lost.fetch_add(n, Ordering::Relaxed);
                        }
                        None => {}
                    }
                }
            });
            (member, task)
        });
        let f = run_pipeline(&s, config.clone(), partitions, messages.len());
        print_run(name, &f, messages.len());
        if let Some((member, task)) = watcher {
            let at_end = seen.load(Ordering::Relaxed);
            let deadline = Instant::now() + Duration::from_secs(30);
            let told = || seen.load(Ordering::Relaxed) + missed.load(Ordering::Relaxed);
            while told() < events as u64 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20)); // progress sampling cadence
            }
            println!(
                "|   ↳ the watcher got {} of the {events} outcomes ({at_end} by the end of the run) and was told it missed {} | | | | | | | | |",
                seen.load(Ordering::Relaxed),
                missed.load(Ordering::Relaxed)
            );
            task.abort();
            member.stop(crm_sync::consume::StopMode::Graceful);
        }
        figures.push(f);
        last = Some((s, config));
    }
    let rate = |f: &RunFigures| f.events as f64 / f.seconds;
    let (off, on, again) = (&figures[1], &figures[2], &figures[3]);
    println!(
        "\nWith a watcher of every outcome, against the mean of the runs without: events/s {:.2}× (the two runs without differ by {:.2}×).",
        rate(on) / ((rate(off) + rate(again)) / 2.0),
        rate(again) / rate(off)
    );

    // GetRecordStatus against a member that processed nothing, of the last run's records.
    let (s, mut config) = last.expect("runs");
    config.kafka.group_id = "load-grpc-lookups".into();
    config.kafka.input_topics = vec!["load-lookups-none".into()];
    let member = crm_sync::pipeline::start(config).expect("lookup member");
    let addr = member.grpc_addr().unwrap().to_string();
    let lookups = 2_000;
    let mut latencies = rt.block_on(async {
        let (mut c, _) = client::connect_as(&addr, TOKEN).await.expect("connect");
        let ask = |r: usize| pb::GetRecordStatusRequest {
            tenant: "bench".into(),
            entity: "contact".into(),
            key: format!("B-{r:07}"),
        };
        let mut rng = rand::thread_rng();
        let sample: Vec<usize> = (0..lookups).map(|_| rng.gen_range(0..events)).collect();
        // Wait until the member has read each of them (its partitions are read side by
        // side), then time the lookups.
        let start = Instant::now();
        for &r in &sample {
            while c.get_record_status(ask(r)).await.is_err() && start.elapsed() < Duration::from_secs(60) {
                tokio::time::sleep(Duration::from_millis(50)).await; // catch-up polling, bounded
            }
        }
        let mut out = Vec::with_capacity(lookups);
        for &r in &sample {
            let t0 = Instant::now();
            c.get_record_status(ask(r)).await.expect("found");
            out.push(t0.elapsed());
        }
        out
    });
    latencies.sort();
    let pct =
        |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)].as_secs_f64() * 1000.0;
    println!(
        "\nGetRecordStatus, {lookups} lookups one at a time of random records, from a member that processed none of them: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms.",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    member.stop(crm_sync::consume::StopMode::Graceful);
    drop(s);
    publish(events);
}

/// IngestService.Publish: events/s over one stream and over 8, each answered once written
/// (idempotent producer, acks from all replicas), with the member's pipeline consuming
/// and delivering what is published, as in production.
fn publish(events: usize) {
    let s = start_sandboxes(12, 0);
    println!("\nIngestService.Publish, {events} events each time:");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for streams in [1usize, 8] {
        let mut config = config(&s, &format!("load-publish-{streams}"), true, 1e6, 32, 200);
        config.grpc = Some(GrpcConfig {
            addr: "127.0.0.1:0".into(),
            admin_token: Some(Secret::new(TOKEN)),
            tenant_tokens: Default::default(),
            status_capacity: 1,
            tls_cert_path: None,
            tls_key_path: None,
        });
        let member = crm_sync::pipeline::start(config).expect("member");
        let addr = member.grpc_addr().unwrap().to_string();
        let payloads: Vec<Vec<u8>> = stream(events, 1, false).into_iter().map(|(_, v)| v).collect();
        let per = events.div_ceil(streams);
        let t0 = Instant::now();
        let accepted: u64 = rt.block_on(async {
            let mut tasks = Vec::new();
            for chunk in payloads.chunks(per) {
                let chunk: Vec<pb::PublishRequest> = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, e)| pb::PublishRequest {
                        id: i.to_string(),
                        event: e.clone(),
                    })
                    .collect();
                let addr = addr.clone();
                tasks.push(tokio::spawn(async move {
                    let mut ingest = client::ingest_as(&addr, TOKEN).await.expect("connect");
                    let mut answers = ingest
                        .publish(tokio_stream::iter(chunk))
                        .await
                        .expect("publish")
                        .into_inner();
                    let mut ok = 0u64;
                    while let Ok(Some(a)) = answers.message().await {
                        ok += u64::from(a.accepted);
                    }
                    ok
                }));
            }
            let mut total = 0;
            for t in tasks {
                total += t.await.unwrap_or(0);
            }
            total
        });
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "- over {streams} stream(s): {accepted} of {events} accepted and written in {secs:.2} s = **{:.0} events/s**",
            accepted as f64 / secs
        );
        member.stop(crm_sync::consume::StopMode::Abort);
    }
}
