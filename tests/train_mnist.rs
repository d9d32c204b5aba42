//! The MLP trainer reaches >= 97% test accuracy on MNIST (784-100-100-10 relu, Adam, batch 64,
//! 12 epochs: configs/mnist-train.toml), and the trained file loads back as an ibasis model.

mod common;
use common::*;

#[test]
#[ignore = "needs data/mnist: scripts/fetch-data.sh mnist"]
fn mlp_trainer_reaches_97_percent_on_mnist() {
    require(&["data/mnist/train-images-idx3-ubyte"]);
    chdir_root();
    let out = tmp("mnist-train").join("mlp.safetensors");
    let report =
        ibasis::experiments::train::train_from_config("configs/mnist-train.toml".as_ref(), &out)
            .unwrap();
    assert!(
        report.test_accuracy >= 0.97,
        "test accuracy {}",
        report.test_accuracy
    );
    // The saved weights evaluate to the same accuracy through the folded model.
    let tensors = ibasis::io::weights::load_safetensors(&out).unwrap();
    let model = ibasis::experiments::config::mlp_from_tensors(
        &tensors,
        ibasis::models::Activation::Relu,
        "mlp",
    )
    .unwrap()
    .into_model("mlp");
    let test = ibasis::data::mnist::Mnist::load("data/mnist".as_ref(), false).unwrap();
    let s = ibasis::experiments::eval::evaluate(&model, &test, None, 2048);
    assert!(
        (s.accuracy - report.test_accuracy).abs() < 2e-3,
        "{} vs {}",
        s.accuracy,
        report.test_accuracy
    );
    let _ = std::fs::remove_dir_all(out.parent().unwrap());
}
