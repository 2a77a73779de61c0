"""The Brownian motion over one step of a fixed-step limit: the step's increment, the
sub-step increments and Lévy areas, and the path a diffrax solver reads them from (see
``lspsde.limits``)."""

import diffrax as dfx
import equinox as eqx
from jaxtyping import Array, Float, PRNGKeyArray


class BrownianIncrements(eqx.Module):
    r"""The Brownian motion over the sub-steps of one step $[k\eta, (k+1)\eta]$ of a limit:
    increments ``W`` and, where the solver needs them, space-time (``H``) and space-time-time
    (``K``) Lévy areas, each of shape ``(n_substeps, m)`` (see [`SGDLimit.increments`][])."""

    W: Float[Array, "*n m"]
    H: Float[Array, "*n m"] | None = None
    K: Float[Array, "*n m"] | None = None


class BrownianStep(eqx.Module):
    r"""What one fixed step of ``SGDLimit`` draws: the step's Brownian increment
    $W((k+1)\eta) - W(k\eta) = \sqrt\eta\,\xi_k$ (with $\xi_k$ SGD's own draw where the noise has
    ``gaussian_draws``) and the key from which the sub-step bridge is drawn as the solver goes."""

    total: Float[Array, " m"]
    key: PRNGKeyArray


class _SubstepPath(dfx.AbstractBrownianPath):
    """The Brownian path over one fixed sub-step, from pre-sampled values.

    Valid only for the sub-step it was made for: fixed-step solvers evaluate the control once,
    over exactly their step ``[t0, t1]``.
    """

    t0: Float[Array, ""]
    t1: Float[Array, ""]
    W: Float[Array, " m"]
    H: Float[Array, " m"] | None
    K: Float[Array, " m"] | None
    levy_area: type = eqx.field(static=True)

    def evaluate(self, t0, t1=None, left: bool = True, use_levy: bool = False):
        del t0, left
        if t1 is None:
            raise ValueError("A pre-sampled sub-step path only gives increments over its step.")
        if not use_levy:
            return self.W
        dt = self.t1 - self.t0
        if self.levy_area is dfx.SpaceTimeTimeLevyArea:
            return dfx.SpaceTimeTimeLevyArea(dt=dt, W=self.W, H=self.H, K=self.K)
        if self.levy_area is dfx.SpaceTimeLevyArea:
            return dfx.SpaceTimeLevyArea(dt=dt, W=self.W, H=self.H)
        return dfx.BrownianIncrement(dt=dt, W=self.W)


def _levy_area(solver: dfx.AbstractSolver) -> type:
    """The Brownian increment type ``solver`` needs (diffrax's ``minimal_levy_area``)."""
    need = getattr(solver, "minimal_levy_area", dfx.AbstractBrownianIncrement)
    if issubclass(need, dfx.AbstractSpaceTimeTimeLevyArea):
        return dfx.SpaceTimeTimeLevyArea
    if issubclass(need, dfx.AbstractSpaceTimeLevyArea):
        return dfx.SpaceTimeLevyArea
    return dfx.BrownianIncrement
