"""bifocal.model.position"""
