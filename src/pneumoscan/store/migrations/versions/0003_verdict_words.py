"""Room for the verdict "no finding called" (17 characters; the column held 16): results.verdict
becomes 32 characters wide. Going back turns that verdict into "indeterminate" first, the word
older PneumoScans used for a film on which nothing was called.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 11:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.alter_column('verdict', existing_type=sa.String(length=16), type_=sa.String(length=32),
                              existing_nullable=True)


def downgrade() -> None:
    op.execute("UPDATE results SET verdict = 'indeterminate' WHERE verdict = 'no finding called'")
    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.alter_column('verdict', existing_type=sa.String(length=32), type_=sa.String(length=16),
                              existing_nullable=True)
