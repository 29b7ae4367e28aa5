"""The interface every token mixer (memory layer, attention, hybrid) implements."""

import equinox as eqx
from jaxtyping import Array, Float, PyTree


class AbstractMixer(eqx.Module):
    """One block's token mixer: maps `(T, d_model)` to `(T, d_model)`, causally.

    - `__call__(x)`: the whole sequence at once (the training path). One sequence; `jax.vmap`
      for a batch.
    - `init_state(max_length)`: the streaming state at the start of a sequence. `max_length`
      bounds the total number of tokens a stream may hold (a KV cache is allocated with it);
      layers with a fixed-size state ignore it.
    - `stream(x, state)`: process the next `x` of a stream (a prompt, or one token), returning
      the outputs and the new state. `stream` over consecutive pieces equals `__call__` over
      their concatenation wherever the layer's chunking makes that exact (digest I-40).
    """

    d_model: eqx.AbstractVar[int]

    def __call__(self, x: Float[Array, "T d_model"]) -> Float[Array, "T d_model"]:
        y, _ = self.stream(x, self.init_state(x.shape[0]))
        return y

    def init_state(self, max_length: int) -> PyTree:
        raise NotImplementedError

    def stream(
        self, x: Float[Array, "T d_model"], state: PyTree
    ) -> tuple[Float[Array, "T d_model"], PyTree]:
        raise NotImplementedError
