//! `scalpel info`: the model's configuration and identity.

use anyhow::Result;

use crate::cli;

pub fn run(margs: &cli::ModelArgs) -> Result<()> {
    let model = cli::load_model(margs)?;
    let cfg = model.cfg();
    let (attn, mlp) = cfg.block_params();
    println!("model        {}", model.identity.name);
    println!("origin       {}", model.origin);
    println!("architecture {}", cfg.arch.name());
    println!("layers       {}", cfg.n_layers);
    println!(
        "hidden       {} (heads {}, kv heads {}, head dim {})",
        cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    );
    println!("mlp          {}", cfg.intermediate_size);
    println!("vocab        {}", cfg.vocab_size);
    println!("params/block attention {attn}, mlp {mlp}");
    println!(
        "quantized    {}",
        if model.has_quantized {
            "yes (kept for fast decode)"
        } else {
            "no"
        }
    );
    println!("hash         {}", model.identity.content_hash);
    Ok(())
}
