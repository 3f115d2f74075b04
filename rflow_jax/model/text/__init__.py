"""The real text encoders of SD3 in Linen (CLIP text towers, the T5 v1.1 encoder) and SD3's composition of them."""
