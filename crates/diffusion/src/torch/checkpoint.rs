//! Gradient checkpointing for the UNet (kohya's `--gradient_checkpointing`): the forward pass
//! runs without autograd and keeps only each layer's output; the backward pass then goes layer by
//! layer from the last, recomputing one layer with autograd from its kept input and pushing the
//! gradient of its output through it. Peak memory holds one layer's intermediates instead of the
//! whole network's, for one more forward pass. (tch has no custom autograd functions, so the
//! backward pass is driven here rather than by `torch.utils.checkpoint`.)

use tch::{Kind, Tensor};

use super::nn::{upsample_nearest, Conv2d};
use super::unet::{AddedCond, ResnetBlock, SpatialTransformer, UNet};
use super::{msg, Result};

/// One layer of the UNet as the checkpointed passes see it.
#[derive(Clone, Copy)]
enum Op<'a> {
    ConvIn,
    /// A ResNet block, on the previous output concatenated with a skip in the up path.
    Res(&'a ResnetBlock),
    Attn(&'a SpatialTransformer),
    Down(&'a Conv2d),
    /// Nearest upsampling to (h, w), then the convolution.
    Up(&'a Conv2d, i64, i64),
}

/// A layer and the kept outputs it reads (node 0 is the UNet's input).
struct Step<'a> {
    op: Op<'a>,
    input: usize,
    skip: Option<usize>,
}

/// What every layer shares: the time embedding and the text context.
struct Shared {
    emb: Tensor,
    ctx: Tensor,
}

impl UNet {
    fn apply(&self, op: Op<'_>, x: &Tensor, skip: Option<&Tensor>, s: &Shared) -> Tensor {
        match op {
            Op::ConvIn => self.conv_in.forward(x),
            Op::Res(r) => match skip {
                Some(k) => r.forward(&Tensor::cat(&[x, k], 1), Some(&s.emb)),
                None => r.forward(x, Some(&s.emb)),
            },
            Op::Attn(a) => a.forward(x, &s.ctx),
            Op::Down(c) => c.forward(x),
            Op::Up(c, h, w) => c.forward(&upsample_nearest(x, h as usize, w as usize)),
        }
    }

    /// The forward pass without autograd: every layer's output (node i + 1 is step i's) and the
    /// steps, in the order [`UNet::forward`] runs them.
    fn record<'a>(&'a self, x: Tensor, s: &Shared) -> Result<(Vec<Tensor>, Vec<Step<'a>>)> {
        let mut nodes = vec![x];
        let mut steps: Vec<Step<'a>> = Vec::new();
        let mut run = |op: Op<'a>, skip: Option<usize>, nodes: &mut Vec<Tensor>| {
            let input = nodes.len() - 1;
            let out = tch::no_grad(|| self.apply(op, &nodes[input], skip.map(|k| &nodes[k]), s));
            nodes.push(out);
            steps.push(Step { op, input, skip });
            nodes.len() - 1
        };
        let mut skips = vec![run(Op::ConvIn, None, &mut nodes)];
        for block in &self.down {
            for (j, r) in block.resnets.iter().enumerate() {
                let mut n = run(Op::Res(r), None, &mut nodes);
                if let Some(a) = block.attentions.get(j) {
                    n = run(Op::Attn(a), None, &mut nodes);
                }
                skips.push(n);
            }
            if let Some(d) = &block.sampler {
                skips.push(run(Op::Down(d), None, &mut nodes));
            }
        }
        run(Op::Res(&self.mid_resnets[0]), None, &mut nodes);
        run(Op::Attn(&self.mid_attention), None, &mut nodes);
        run(Op::Res(&self.mid_resnets[1]), None, &mut nodes);
        for block in &self.up {
            for (j, r) in block.resnets.iter().enumerate() {
                let skip = skips
                    .pop()
                    .ok_or_else(|| msg("unet: skip connections out of step"))?;
                run(Op::Res(r), Some(skip), &mut nodes);
                if let Some(a) = block.attentions.get(j) {
                    run(Op::Attn(a), None, &mut nodes);
                }
            }
            if let Some(u) = &block.sampler {
                let last = &nodes[nodes.len() - 1];
                let (th, tw) = match skips.last() {
                    Some(&k) => (nodes[k].size()[2], nodes[k].size()[3]),
                    None => (last.size()[2] * 2, last.size()[3] * 2),
                };
                run(Op::Up(u, th, tw), None, &mut nodes);
            }
        }
        Ok((nodes, steps))
    }

    /// [`UNet::forward`] followed by `head` (its output → a scalar loss) and the backward pass
    /// of that loss, checkpointed layer by layer: every parameter requiring gradients (the
    /// adapters, and through `context` and `added` whatever produced them) accumulates its
    /// gradient as `head(self.forward(..)).backward()` would. Returns the loss.
    pub fn backward_checkpointed(
        &self,
        x: &Tensor,
        t: &Tensor,
        context: &Tensor,
        added: Option<&AddedCond>,
        head: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<f64> {
        let kind = self.conv_in.weight.kind();
        let b = x.size()[0];
        let t = if t.dim() == 0 {
            t.expand([b], false)
        } else {
            t.shallow_clone()
        };
        // The shared inputs as leaves; what produced them gets their gradients at the end.
        let emb_full = self.embedding(&t, added, kind)?;
        let ctx_full = context.to_kind(kind);
        let leaf = |t: &Tensor| t.detach().set_requires_grad(t.requires_grad());
        let shared = Shared {
            emb: leaf(&emb_full),
            ctx: leaf(&ctx_full),
        };
        let (nodes, steps) = self.record(x.to_kind(kind).detach(), &shared)?;
        let last = nodes.len() - 1;
        let h = nodes[last].detach().set_requires_grad(true);
        let loss = head(&self.conv_out.forward(&self.norm_out.forward_silu(&h)))?;
        let value = loss.double_value(&[]);
        loss.f_backward()?;
        let mut grads: Vec<Option<Tensor>> = (0..nodes.len()).map(|_| None).collect();
        grads[last] = Some(h.grad());
        for (i, step) in steps.iter().enumerate().rev() {
            let Some(g) = grads[i + 1].take() else {
                continue;
            };
            let input = nodes[step.input]
                .detach()
                .set_requires_grad(step.input != 0);
            let skip = step.skip.map(|k| nodes[k].detach().set_requires_grad(true));
            let out = self.apply(step.op, &input, skip.as_ref(), &shared);
            if !out.requires_grad() {
                continue; // nothing before this layer trains (the first convolution, say)
            }
            (out.to_kind(Kind::Float) * g.to_kind(Kind::Float))
                .sum(Kind::Float)
                .f_backward()?;
            add_grad(&mut grads, step.input, &input);
            if let (Some(k), Some(s)) = (step.skip, &skip) {
                add_grad(&mut grads, k, s);
            }
        }
        for (full, leaf) in [(&emb_full, &shared.emb), (&ctx_full, &shared.ctx)] {
            let g = leaf.grad();
            if full.requires_grad() && g.defined() {
                (full.to_kind(Kind::Float) * g.to_kind(Kind::Float))
                    .sum(Kind::Float)
                    .f_backward()?;
            }
        }
        Ok(value)
    }
}

/// Adds `leaf`'s gradient (when it has one) to node `n`'s.
fn add_grad(grads: &mut [Option<Tensor>], n: usize, leaf: &Tensor) {
    let g = leaf.grad();
    if !g.defined() {
        return;
    }
    grads[n] = Some(match grads[n].take() {
        Some(acc) => acc + g,
        None => g,
    });
}
