"""Reader studies: studies, their cases (stored results with truth), each reader's seeded steps
(a case in an arm), and append-only ratings.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 13:11:04.534770
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('studies',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('design', sa.String(length=16), nullable=False),
    sa.Column('washout_days', sa.Float(), nullable=False),
    sa.Column('targets', sa.JSON(), nullable=False),
    sa.Column('seed', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('study_cases',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('result_id', sa.Integer(), nullable=False),
    sa.Column('truth', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['result_id'], ['results.id'], ),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('study_id', 'result_id', name='uq_study_case')
    )
    with op.batch_alter_table('study_cases', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_study_cases_study_id'), ['study_id'], unique=False)

    op.create_table('study_steps',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('reader_id', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('case_id', sa.Integer(), nullable=False),
    sa.Column('arm', sa.String(length=16), nullable=False),
    sa.Column('washout_before', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['case_id'], ['study_cases.id'], ),
    sa.ForeignKeyConstraint(['reader_id'], ['readers.id'], ),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('study_id', 'reader_id', 'position', name='uq_study_step')
    )
    with op.batch_alter_table('study_steps', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_study_steps_reader_id'), ['reader_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_study_steps_study_id'), ['study_id'], unique=False)

    op.create_table('study_ratings',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('step_id', sa.Integer(), nullable=False),
    sa.Column('target', sa.String(length=32), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('call', sa.Boolean(), nullable=False),
    sa.Column('seconds', sa.Float(), nullable=True),
    sa.Column('correction', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['step_id'], ['study_steps.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('step_id', 'target', 'seq', name='uq_study_rating')
    )
    with op.batch_alter_table('study_ratings', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_study_ratings_step_id'), ['step_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('study_ratings', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_study_ratings_step_id'))

    op.drop_table('study_ratings')
    with op.batch_alter_table('study_steps', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_study_steps_study_id'))
        batch_op.drop_index(batch_op.f('ix_study_steps_reader_id'))

    op.drop_table('study_steps')
    with op.batch_alter_table('study_cases', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_study_cases_study_id'))

    op.drop_table('study_cases')
    op.drop_table('studies')
