"""The maths every variant shares: JumpReLU with its pseudo-derivatives (:mod:`.functional`) and
the fused training steps with hand-written backward passes (:mod:`.fused`, :mod:`.clt_fused`)."""
