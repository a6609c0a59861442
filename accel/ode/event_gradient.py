"""The gradient of an event time: the implicit function theorem, for accel.odeint's events (one for the whole state,
or one per sample with per_sample=True)."""
import torch


class EventGradient(torch.autograd.Function):
    """(event time, state there) from the state there, whose backward adds the implicit function theorem's terms:
    the event time tau solves c(tau, y(tau)) = 0, so d tau = -(dc/dy . dy(tau)) / (dc/dt + dc/dy . f), and the
    state at it moves with f d tau. ``rate(tau, y)`` and ``event(tau, y)`` take the user's times and the flat rows
    (R, N); tau is one time (a 0-d tensor) for R = 1, or one per row (R,)."""

    @staticmethod
    def forward(ctx, rate, event, event_t, y_event):
        ctx.rate, ctx.event = rate, event
        ctx.save_for_backward(event_t, y_event)
        return event_t.clone(), y_event.detach().clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_t, grad_y):
        event_t, y_event = ctx.saved_tensors
        with torch.enable_grad():
            tau = event_t.detach().requires_grad_()
            y = y_event.detach().requires_grad_()
            c = ctx.event(tau, y)
            dc_dt, dc_dy = torch.autograd.grad(c.sum(), (tau, y), allow_unused=True) if c.requires_grad else \
                (None, None)
        f = ctx.rate(event_t, y_event).detach()
        dc_dt = torch.zeros_like(tau) if dc_dt is None else dc_dt
        dc_dy = torch.zeros_like(y) if dc_dy is None else dc_dy
        total_t = grad_t + (grad_y * f).sum(-1)
        move = (total_t / (dc_dt + (dc_dy * f).sum(-1))).to(y.dtype)
        return None, None, None, grad_y - dc_dy * move[:, None]
