//! The workbench's background worker on the real test model: what it
//! measures and sends, without a terminal.

mod common;

use std::sync::{mpsc, Arc};
use std::time::Duration;

use candle_core::Device;
use scalpel::model::{LocalModel, Model, Resolved};
use scalpel::plan::{LayerScales, Plan};
use scalpel::tui::app::{Request, Speed, Update};
use scalpel::tui::jobs::Setup;
use scalpel::tui::worker::Worker;

/// Waits for the speed of `plan`, passing over everything else.
fn speed_of(rx: &mpsc::Receiver<Update>, plan: &Plan) -> Speed {
    loop {
        match rx.recv_timeout(Duration::from_secs(600)) {
            Ok(Update::Speed { plan: p, speed }) if &p == plan => return speed,
            Ok(Update::EvalFailed { plan: p, error }) if &p == plan => panic!("{error}"),
            Ok(Update::Crashed { message, .. }) => panic!("a job crashed: {message}"),
            Ok(_) => {}
            Err(e) => panic!("no speed for {}: {e}", plan.describe()),
        }
    }
}

#[test]
fn plans_equal_to_the_base_show_the_base_speed_exactly() {
    let resolved = Resolved {
        local: LocalModel::Gguf(common::smollm2_path()),
        origin: "test".into(),
    };
    let model = Model::load(&resolved, &Device::Cpu).expect("loading SmolLM2");
    let setup = Setup::for_model(&model).unwrap();
    let (tx, rx) = mpsc::channel();
    // The worker measures the base first on its own.
    let worker = Worker::spawn(Arc::new(model), Arc::new(setup), tx);
    let base = speed_of(&rx, &Plan::base());
    // Timed against itself it used to differ (×0.47 and ×2.06 were seen).
    assert_eq!(base.plan_decode, base.base_decode, "{base:?}");
    assert_eq!(base.plan_prefill, base.base_prefill, "{base:?}");
    assert!(base.base_decode > 0.0 && base.base_prefill > 0.0);

    // Scales that are all 1 compute the base model: not timed again.
    let mut identity = Plan::base();
    identity.scales = Some(vec![LayerScales::IDENTITY; 30]);
    worker.send(Request::Evaluate(identity.clone()));
    let same = speed_of(&rx, &identity);
    assert_eq!((same.decode_ratio(), same.prefill_ratio()), (1.0, 1.0));
    if base.overlap.is_clean() {
        assert_eq!(same, base, "the base's clean measurement is reused");
    }
    worker.shutdown();
}
